# The ports of the platform, in one place for the NixOS module, `nix run .#platform` and
# the VM test. Plain data, no nixpkgs: tests/offline/nix_files.rs evaluates this file with
# `nix-instantiate --eval` and checks it against etc/kop/*.toml.
{
  # The four daemons: their metrics port (`[metrics] listen`), and the order API.
  daemons = {
    order = {
      metrics = 9100;
      api = 4000;
    };
    payment.metrics = 9104;
    inventory.metrics = 9102;
    notification.metrics = 9103;
  };

  # Instances of a stage (services.kop.<stage>.instances, systemd/kop-<stage>@.service):
  # instance N gets metrics port base + N (9111, 9112, ... for kop-payment@1, @2, ...).
  instances = {
    payment = 9110;
    inventory = 9120;
    notification = 9130;
  };

  kafka = 9092;
  kafkaController = 9093;
  # kminion, the Kafka exporter of nixpkgs (services.prometheus.exporters.kafka).
  kminion = 9308;
  prometheus = 9090;
  grafana = 3000;
}
