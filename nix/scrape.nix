# Prometheus scrape jobs for one host running everything (the NixOS module's local mode
# and `nix run .#platform`). Same job names as docker/prometheus/prometheus.yml, so the
# rules in docker/prometheus/alerts.yml and the dashboard read the same series.
# Plain data: no nixpkgs needed.
# kopPorts: the metrics ports of the daemons on the host (the NixOS module passes those of
# the daemons it runs and of their instances).
{
  ports,
  kopPorts ? map (name: ports.daemons.${name}.metrics) [
    "order"
    "payment"
    "inventory"
    "notification"
  ],
}:
let
  target = port: "127.0.0.1:${toString port}";
in
[
  {
    job_name = "prometheus";
    static_configs = [ { targets = [ (target ports.prometheus) ]; } ];
  }
  {
    # Every kop series carries its own `service` label, so one job is enough.
    job_name = "kop";
    metrics_path = "/metrics";
    static_configs = [
      {
        targets = map target kopPorts;
      }
    ];
  }
  {
    job_name = "kafka-exporter";
    scrape_interval = "15s";
    static_configs = [ { targets = [ (target ports.kminion) ]; } ];
  }
]
