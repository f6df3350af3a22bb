# checks.<system>.vm: one NixOS VM with services.kop and its local platform (Kafka in
# KRaft mode, Prometheus + kminion, Grafana). Orders go in through the API and must come
# out of inventory.reserved exactly once; journald, Prometheus and Grafana are checked.
{ pkgs, self }:
let
  ports = import ./ports.nix;
  daemons = pkgs.lib.mapAttrsToList (name: _: name) ports.daemons;
in
pkgs.testers.runNixOSTest {
  name = "kop";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];

      services.kop = {
        enable = true;
        local.enable = true;
      };

      # Kafka's JVM, Prometheus, Grafana, kminion and four daemons.
      virtualisation = {
        memorySize = 4096; # MiB
        diskSize = 4096; # MB
        cores = 2;
      };

      environment.systemPackages = [
        pkgs.kcat
        pkgs.curl
        pkgs.jq
      ];
    };

  testScript = ''
    import json
    import shlex

    daemons = ${builtins.toJSON daemons}
    metrics_ports = ${builtins.toJSON (map (name: ports.daemons.${name}.metrics) daemons)}
    api = "http://127.0.0.1:${toString ports.daemons.order.api}"
    brokers = "127.0.0.1:${toString ports.kafka}"
    prometheus = "http://127.0.0.1:${toString ports.prometheus}"
    grafana = "http://127.0.0.1:${toString ports.grafana}"
    orders = [f"vm-order-{i}" for i in range(1, 6)]


    def prometheus_has(query, jq_filter):
        """A shell command that succeeds once the instant query's result passes jq_filter."""
        return (
            f"curl -sf --get --data-urlencode {shlex.quote('query=' + query)} "
            f"{prometheus}/api/v1/query | jq -e {shlex.quote(jq_filter)}"
        )


    def reserved_keys():
        """Keys of the committed records of inventory.reserved, one per record."""
        return machine.succeed(
            f"kcat -b {brokers} -X isolation.level=read_committed -C -t inventory.reserved "
            "-o beginning -e -q -f '%k\\n'"
        ).split()


    machine.start()

    with subtest("Kafka runs in KRaft mode"):
        machine.wait_for_unit("apache-kafka.service")
        machine.wait_for_open_port(${toString ports.kafka})

    with subtest("the daemons report READY=1 (Type=notify) and serve /readyz"):
        for daemon in daemons:
            machine.wait_for_unit(f"kop-{daemon}.service")
        machine.wait_for_unit("kop.target")
        machine.wait_for_open_port(${toString ports.daemons.order.api})
        for port in metrics_ports:
            machine.succeed(f"curl -sf http://127.0.0.1:{port}/readyz")

    with subtest("the API accepts orders once Kafka acknowledged them"):
        for i, order in enumerate(orders):
            body = json.dumps({"orderId": order, "amount": 10 + i})
            answer = json.loads(
                machine.succeed(
                    f"curl -sf -X POST {api}/order -H 'Content-Type: application/json' "
                    f"-d {shlex.quote(body)}"
                )
            )
            assert answer["status"] == "accepted", answer

    with subtest("every order reaches inventory.reserved, exactly once"):
        machine.wait_until_succeeds(
            f"test \"$(kcat -b {brokers} -X isolation.level=read_committed -C "
            "-t inventory.reserved -o beginning -e -q -f '%k\\n' | grep -c '^vm-order-')\" -ge 5",
            timeout=300,
        )
        keys = reserved_keys()
        assert sorted(keys) == sorted(orders), keys

    with subtest("journald finds an order by its ORDER_ID field"):
        for daemon in ["payment", "inventory", "notification"]:
            machine.wait_until_succeeds(
                f"journalctl -u kop-{daemon}.service ORDER_ID={orders[0]} -o export "
                f"| grep -qx 'ORDER_ID={orders[0]}'",
                timeout=60,
            )

    with subtest("Prometheus scrapes the daemons and kminion, and loaded the alert rules"):
        machine.wait_for_unit("prometheus.service")
        machine.wait_for_unit("prometheus-kafka-exporter.service")
        machine.wait_until_succeeds(
            prometheus_has('count(up{job="kop"} == 1)', '.data.result[0].value[1] == "4"'),
            timeout=120,
        )
        machine.wait_until_succeeds(
            prometheus_has(
                "sum by (service) (kafka_messages_consumed_total)",
                '[.data.result[].metric.service] | sort'
                ' == ["inventory-service", "notification-service", "payment-service"]',
            ),
            timeout=120,
        )
        machine.wait_until_succeeds(
            prometheus_has('count({__name__=~"kminion_.+"})', ".data.result[0].value[1] | tonumber > 0"),
            timeout=120,
        )
        machine.succeed(
            f"curl -sf {prometheus}/api/v1/rules | jq -e '[.data.groups[].rules[]] | length > 0'"
        )

    with subtest("Grafana serves the provisioned kop dashboard"):
        machine.wait_for_unit("grafana.service")
        machine.wait_for_open_port(${toString ports.grafana})
        machine.wait_until_succeeds(
            f"curl -sf -u admin:admin {grafana}/api/dashboards/uid/kop | jq -e '.dashboard.uid == \"kop\"'",
            timeout=120,
        )
        machine.succeed(
            f"curl -sf -u admin:admin {grafana}/api/datasources/uid/prometheus | jq -e '.type == \"prometheus\"'"
        )

    with subtest("stopping kop.target drains every daemon to a clean exit"):
        machine.succeed("systemctl stop kop.target")
        for daemon in daemons:
            result = machine.succeed(f"systemctl show -P Result kop-{daemon}.service").strip()
            assert result == "success", f"kop-{daemon}: {result}"
  '';
}
