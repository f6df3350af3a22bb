# checks.<system>.vm: one NixOS VM with services.kop and its local platform (Kafka in
# KRaft mode, Prometheus + kminion, Grafana). Orders go in through the API and must come
# out of inventory.reserved exactly once; journald, Prometheus and Grafana are checked;
# the secrets options hand files from outside the store to the daemons; each daemon,
# stopped with orders in flight, drains (exits 0 by itself) and loses no order. kop-payment
# runs as two instances (kop-payment@1, @2) that share the partitions of orders.created.
#
# tests/offline/nix_files.rs evaluates this file with stand-ins for pkgs and self and checks
# the testScript as the test driver's build does (Python syntax, pyflakes).
{ pkgs, self }:
let
  ports = import ./ports.nix;
  instances = import ./instances.nix { inherit ports; };
  kafka = "127.0.0.1:${toString ports.kafka}";
  # services.kop.payment.instances: kop-payment@1 and @2 in place of kop-payment.
  payments = instances.numbers 2;
  # The units and their metrics ports, as the module names and numbers them.
  daemons =
    [
      {
        unit = "kop-order.service";
        port = ports.daemons.order.metrics;
      }
    ]
    ++ map (n: {
      unit = "${instances.unitName "payment" n}.service";
      port = instances.metricsPort (instances.metricsBase "payment") n;
    }) payments
    ++ map
      (name: {
        unit = "kop-${name}.service";
        port = ports.daemons.${name}.metrics;
      })
      [
        "inventory"
        "notification"
      ];
in
pkgs.testers.runNixOSTest {
  name = "kop";

  nodes.machine =
    { pkgs, lib, ... }:
    {
      imports = [ self.nixosModules.default ];

      services.kop = {
        enable = true;
        local.enable = true;
        # Each record waits 200 ms in each stage (records are handled concurrently), so
        # that the stages still have orders in flight when they are stopped.
        settings = lib.genAttrs [
          "payment"
          "inventory"
        ] (_: { simulate.delay = "200ms"; });

        # Files that never enter the store, one option each: a credential named from the
        # settings' point of view by its path, an environment file, and a whole
        # configuration file handed over as a credential.
        payment.credentials."kafka-ca.pem" = "/etc/kop-secrets/kafka-ca.pem";
        payment.instances = builtins.length payments;
        inventory.environmentFile = "/etc/kop-secrets/inventory.env";
        notification.configFile = "/etc/kop-secrets/notification.toml";
      };

      # The secret files. On a real host they come from outside Nix (a secrets manager, a
      # provisioning step); the test writes them from the store, and `mode` makes NixOS
      # copy them into /etc, root-only, instead of linking to the world-readable store.
      environment.etc = {
        "kop-secrets/kafka-ca.pem" = {
          mode = "0400";
          text = "not a certificate: the broker is PLAINTEXT; only where it lands is checked\n";
        };
        "kop-secrets/inventory.env" = {
          mode = "0400";
          text = "KAFKA_BROKERS=${kafka}\n";
        };
        "kop-secrets/notification.toml" = {
          mode = "0400";
          text = ''
            [kafka]
            "bootstrap.servers" = "${kafka}"

            [simulate]
            delay = "200ms"
          '';
        };
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

  testScript =
    { nodes }:
    ''
      import json
      import shlex

      units = ${builtins.toJSON (map (d: d.unit) daemons)}
      metrics_ports = ${builtins.toJSON (map (d: d.port) daemons)}
      payments = ${builtins.toJSON (map (n: "${instances.unitName "payment" n}.service") payments)}
      api = "http://127.0.0.1:${toString ports.daemons.order.api}"
      brokers = "${kafka}"
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


      def wait_reserved(count):
          """Waits until inventory.reserved holds at least count committed orders of the test."""
          machine.wait_until_succeeds(
              f"test \"$(kcat -b {brokers} -X isolation.level=read_committed -C "
              "-t inventory.reserved -o beginning -e -q -f '%k\\n' | grep -c '^vm-')\" "
              f"-ge {count}",
              timeout=300,
          )


      def unit_properties(unit, names):
          """systemctl show -p NAME,NAME... of a unit, as a dict."""
          properties: dict[str, str] = {}
          for line in machine.succeed(f"systemctl show -p {','.join(names)} {unit}").splitlines():
              key, _, value = line.partition("=")
              properties[key] = value
          return properties


      def invocation_ids():
          """The invocation id of each daemon's current run: its journal entries carry it."""
          return {
              unit: machine.succeed(f"systemctl show -P InvocationID {unit}").strip()
              for unit in units
          }


      def assert_drained(unit, invocation):
          """The run of unit ended by the daemon's own exit with status 0, after its drain.

          systemd counts a process killed by SIGTERM as a success too (Result=success), so a
          daemon that ignored the signal would pass a check of Result alone: ExecMainCode
          must be 1 (CLD_EXITED), not 2 (killed). One that hung would have been killed at
          TimeoutStopSec (Result=timeout)."""
          properties = unit_properties(
              unit, ["ActiveState", "Result", "ExecMainCode", "ExecMainStatus"]
          )
          wanted = {
              "ActiveState": "inactive",
              "Result": "success",
              "ExecMainCode": "1",
              "ExecMainStatus": "0",
          }
          assert properties == wanted, f"{unit}: {properties}, wanted {wanted}"
          # What the daemon logged on SIGTERM and at its exit; a stage also logs the end of
          # its drain (its last batch committed or aborted, the group left).
          logged = ["stopping: finishing the work in progress", "stopped"]
          if unit != "kop-order.service":
              logged.append("draining done")
          for text in logged:
              machine.wait_until_succeeds(
                  f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={invocation} "
                  f"| grep -qF {shlex.quote(text)}",
                  timeout=30,
              )


      machine.start()

      with subtest("Kafka runs in KRaft mode"):
          machine.wait_for_unit("apache-kafka.service")
          machine.wait_for_open_port(${toString ports.kafka})

      with subtest("the daemons report READY=1 (Type=notify) and serve /readyz"):
          for unit in units:
              machine.wait_for_unit(unit)
          machine.wait_for_unit("kop.target")
          machine.wait_for_open_port(${toString ports.daemons.order.api})
          for port in metrics_ports:
              machine.succeed(f"curl -sf http://127.0.0.1:{port}/readyz")

      with subtest("secret files reach the daemons from outside the store"):
          for name in ["kafka-ca.pem", "inventory.env", "notification.toml"]:
              # Root-only copies (environment.etc with a mode), not links into the store.
              machine.succeed(
                  f"test ! -L /etc/kop-secrets/{name}"
                  f" && test \"$(stat -c '%a %U' /etc/kop-secrets/{name})\" = '400 root'"
              )
          # configFile: kop-notification runs on the file, handed over as a credential.
          pid = machine.succeed("systemctl show -P MainPID kop-notification.service").strip()
          command = machine.succeed(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
          assert (
              "--config /run/credentials/kop-notification.service/notification.toml" in command
          ), command
          # credentials: each instance has its own directory (the settings of each name it
          # where they name services.kop.payment.credentialsDirectory).
          assert "${nodes.machine.services.kop.payment.credentialsDirectory}" == (
              "/run/credentials/kop-payment.service"
          )
          for unit in payments:
              machine.succeed(
                  f"cmp /etc/kop-secrets/kafka-ca.pem /run/credentials/{unit}/kafka-ca.pem"
              )
          # environmentFile: the variables are in kop-inventory's environment.
          pid = machine.succeed("systemctl show -P MainPID kop-inventory.service").strip()
          machine.succeed(f"tr '\\0' '\\n' < /proc/{pid}/environ | grep -qx 'KAFKA_BROKERS={brokers}'")

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
          wait_reserved(len(orders))
          keys = reserved_keys()
          assert sorted(keys) == sorted(orders), keys

      with subtest("the instances of kop-payment share the partitions, each its own producer"):

          def payments_share_partitions(last_try):
              """Each instance logs its assignment (input and retry partitions) at every
              rebalance: the last one of each must be non-empty, and together they must hold
              all 2 x 3 partitions (the range assignor gives each to one member). Each
              initialised its own transactional id, <host>-<instance> (%H-%i)."""
              held = {}
              for n, unit in enumerate(payments, start=1):
                  entries = [
                      json.loads(line)
                      for line in machine.succeed(
                          f"journalctl --no-pager -b -u {unit} -o json "
                          "--output-fields=MESSAGE,PARTITIONS,TRANSACTIONAL_ID"
                      ).splitlines()
                  ]
                  producers = {entry.get("TRANSACTIONAL_ID") for entry in entries} - {None}
                  assert producers == {f"kop-payment-service-machine-{n}"}, (unit, producers)
                  events = [
                      entry
                      for entry in entries
                      if entry.get("MESSAGE") in ("partitions assigned", "partitions revoked")
                  ]
                  last = events[-1] if events else {}
                  if last.get("MESSAGE") == "partitions assigned":
                      held[unit] = int(last["PARTITIONS"])
              shared = len(held) == len(payments) and 0 not in held.values()
              if shared and sum(held.values()) == 6:
                  return True
              assert not last_try, f"the partitions held by each instance: {held}"
              return False

          retry(payments_share_partitions, timeout=120)

      with subtest("journald finds an order by its ORDER_ID field"):
          # Either instance of kop-payment may have handled it.
          for units_of in ["kop-payment@*", "kop-inventory.service", "kop-notification.service"]:
              machine.wait_until_succeeds(
                  f"journalctl -u '{units_of}' ORDER_ID={orders[0]} -o export "
                  f"| grep -qx 'ORDER_ID={orders[0]}'",
                  timeout=60,
              )

      with subtest("Prometheus scrapes the daemons and kminion, and loaded the alert rules"):
          machine.wait_for_unit("prometheus.service")
          machine.wait_for_unit("prometheus-kafka-exporter.service")
          machine.wait_until_succeeds(
              prometheus_has(
                  'count(up{job="kop"} == 1)', f'.data.result[0].value[1] == "{len(units)}"'
              ),
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

      with subtest("each daemon, stopped with orders in flight, drains and loses no order"):
          # The orders go in within seconds from one loop in the machine; the stages take
          # 200 ms per record, so they are still working when they are stopped.
          drain_orders = [f"vm-drain-{i}" for i in range(1, 301)]
          answers = machine.succeed(
              f"for i in $(seq 1 {len(drain_orders)}); do "
              f"curl -sf -X POST {api}/order -H 'Content-Type: application/json' "
              """-d '{"orderId":"vm-drain-'$i'","amount":1}' """
              """| jq -r '.status + " " + .orderId'; done"""
          )
          accepted = [line.split()[1] for line in answers.splitlines() if line.startswith("accepted ")]
          assert sorted(accepted) == sorted(drain_orders), answers

          runs = invocation_ids()
          # The daemons themselves, not kop.target: systemctl returns once each stop job is
          # done, that is once each daemon has exited (or been killed at TimeoutStopSec).
          machine.succeed("systemctl stop " + " ".join(units))
          in_time = [key for key in reserved_keys() if key.startswith("vm-drain-")]
          print(f"{len(in_time)} of {len(accepted)} orders had gone through when the daemons stopped")
          for unit in units:
              assert_drained(unit, runs[unit])

          # Started again (Type=notify: systemctl returns once each sent READY=1), the stages
          # go on from what the stopped ones committed: every accepted order arrives, once.
          machine.succeed("systemctl start " + " ".join(units))
          machine.wait_for_unit("kop.target")
          wait_reserved(len(orders) + len(accepted))
          keys = reserved_keys()
          assert sorted(keys) == sorted(orders + accepted), keys

      with subtest("stopping kop.target stops and drains all four daemons"):
          runs = invocation_ids()
          machine.succeed("systemctl stop kop.target")
          # The target's own stop job can be done before the daemons' (they are ordered
          # before it and stop after it): wait for each daemon's end.
          for unit in units:
              machine.wait_until_succeeds(
                  f"systemctl show -P ActiveState {unit} | grep -qx -e inactive -e failed",
                  timeout=60,
              )
              assert_drained(unit, runs[unit])
    '';
}
