# `nix run .#platform`: the whole platform on this machine, from store paths, with all
# state in one temporary directory — Apache Kafka (KRaft, one JVM), Prometheus (scraping
# the daemons and kminion, with docker/prometheus/alerts.yml), Grafana (admin/admin, the
# kop dashboard), kminion and the four daemons. Ctrl-C stops everything and removes the
# directory. KAFKA_BROKERS=host:port uses a running broker instead of starting one.
{
  lib,
  writeShellApplication,
  writeText,
  runCommand,
  formats,
  coreutils,
  curl,
  apacheKafka,
  prometheus,
  grafana,
  kminion,
  kop,
}:

let
  ports = import ./ports.nix;
  port = toString;
  jre = apacheKafka.passthru.jre;

  # Kafka 4 logs through log4j2; everything to stdout, which goes to kafka.log.
  kafkaLog4j = writeText "kop-platform-kafka-log4j2.properties" ''
    status = warn
    appender.stdout.type = Console
    appender.stdout.name = STDOUT
    appender.stdout.layout.type = PatternLayout
    appender.stdout.layout.pattern = [%d] %p %m (%c)%n
    rootLogger.level = INFO
    rootLogger.appenderRef.stdout.ref = STDOUT
    logger.config.name = org.apache.kafka.common.config
    logger.config.level = WARN
    logger.statechange.name = state.change.logger
    logger.statechange.level = WARN
  '';

  # The broker's settings without the two lines that depend on the run (log.dirs, and
  # the cluster id given to the storage format).
  kafkaProperties = writeText "kop-platform-server.properties" ''
    process.roles=broker,controller
    node.id=1
    controller.quorum.voters=1@127.0.0.1:${port ports.kafkaController}
    controller.listener.names=CONTROLLER
    listeners=PLAINTEXT://127.0.0.1:${port ports.kafka},CONTROLLER://127.0.0.1:${port ports.kafkaController}
    advertised.listeners=PLAINTEXT://127.0.0.1:${port ports.kafka}
    listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
    inter.broker.listener.name=PLAINTEXT
    auto.create.topics.enable=false
    num.partitions=3
    offsets.topic.replication.factor=1
    offsets.topic.num.partitions=10
    transaction.state.log.replication.factor=1
    transaction.state.log.min.isr=1
    transaction.state.log.num.partitions=10
    share.coordinator.state.topic.replication.factor=1
    share.coordinator.state.topic.min.isr=1
    group.initial.rebalance.delay.ms=0
  '';

  # Checked with promtool when the app is built, like the NixOS module does.
  prometheusConfig =
    let
      file = (formats.yaml { }).generate "kop-platform-prometheus.yml" {
        global = {
          scrape_interval = "5s";
          evaluation_interval = "5s";
        };
        rule_files = [ "${../docker/prometheus/alerts.yml}" ];
        scrape_configs = import ./scrape.nix { inherit ports; };
      };
    in
    runCommand "kop-platform-prometheus.yml" { nativeBuildInputs = [ prometheus.cli ]; } ''
      promtool check config ${file}
      cp ${file} $out
    '';

  # As docker/grafana/provisioning: the dashboard refers to the datasource by uid.
  grafanaDatasources = writeText "kop-platform-datasources.yaml" (
    builtins.toJSON {
      apiVersion = 1;
      datasources = [
        {
          name = "Prometheus";
          uid = "prometheus";
          type = "prometheus";
          access = "proxy";
          url = "http://127.0.0.1:${port ports.prometheus}";
          isDefault = true;
          editable = false;
          jsonData.timeInterval = "5s";
        }
      ];
    }
  );
  grafanaDashboards = writeText "kop-platform-dashboards.yaml" (
    builtins.toJSON {
      apiVersion = 1;
      providers = [
        {
          name = "kop";
          folder = "kop";
          type = "file";
          disableDeletion = true;
          options.path = "${../docker/grafana/dashboards}";
        }
      ];
    }
  );

  daemonPorts = lib.concatStringsSep " " (
    lib.mapAttrsToList (name: p: "${name}:${port p.metrics}") ports.daemons
  );
in
writeShellApplication {
  name = "kop-platform";
  runtimeInputs = [
    coreutils
    curl
  ];
  text = ''
    state=$(mktemp -d "''${TMPDIR:-/tmp}/kop-platform.XXXXXX")
    pids=()
    names=()

    log() { printf 'kop-platform: %s\n' "$*" >&2; }

    # Stops what was started, last first (the daemons drain before Kafka goes), then
    # removes the state directory.
    # shellcheck disable=SC2317,SC2329 # invoked by the EXIT trap
    cleanup() {
      local rc=$? i
      trap - EXIT INT TERM
      set +e
      for ((i = ''${#pids[@]} - 1; i >= 0; i--)); do
        if kill -0 "''${pids[i]}" 2>/dev/null; then
          log "stopping ''${names[i]}"
          kill -TERM "''${pids[i]}" 2>/dev/null
          timeout 30 tail --pid="''${pids[i]}" -f /dev/null 2>/dev/null ||
            kill -KILL "''${pids[i]}" 2>/dev/null
        fi
      done
      wait 2>/dev/null
      rm -rf "$state"
      exit "$rc"
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # start NAME COMMAND...: runs COMMAND in the background, output in $state/NAME.log.
    start() {
      local name=$1
      shift
      "$@" </dev/null >"$state/$name.log" 2>&1 &
      pids+=("$!")
      names+=("$name")
    }

    port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

    # wait_until SECONDS NAME COMMAND...: until COMMAND succeeds; gives up with the
    # end of NAME's log.
    wait_until() {
      local deadline=$((SECONDS + $1)) name=$2
      shift 2
      until "$@"; do
        if ((SECONDS >= deadline)); then
          log "$name did not come up; the end of its log:"
          tail -n 30 "$state/$name.log" >&2 || true
          exit 1
        fi
        sleep 0.5
      done
    }

    for p in ${port ports.prometheus} ${port ports.grafana} ${port ports.kminion} ${port ports.daemons.order.api} \
      ${lib.concatMapStringsSep " " (p: port p.metrics) (lib.attrValues ports.daemons)}; do
      if port_open "$p"; then
        log "port $p is already in use: stop what listens there first"
        exit 1
      fi
    done

    brokers=''${KAFKA_BROKERS:-}
    if [[ -z $brokers ]]; then
      brokers=127.0.0.1:${port ports.kafka}
      if port_open ${port ports.kafka}; then
        log "port ${port ports.kafka} is already in use (set KAFKA_BROKERS to use that broker)"
        exit 1
      fi
      mkdir -p "$state/kafka"
      cp ${kafkaProperties} "$state/kafka/server.properties"
      chmod u+w "$state/kafka/server.properties"
      echo "log.dirs=$state/kafka/data" >>"$state/kafka/server.properties"
      kafka_java=(${jre}/bin/java -Dlog4j2.configurationFile=${kafkaLog4j} -cp '${apacheKafka}/libs/*')
      cluster_id=$("''${kafka_java[@]}" kafka.tools.StorageTool random-uuid | tail -n 1)
      log "formatting Kafka's storage (cluster $cluster_id)"
      "''${kafka_java[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$state/kafka/server.properties" >"$state/kafka-format.log" 2>&1 || {
        cat "$state/kafka-format.log" >&2
        exit 1
      }
      log "starting Kafka on $brokers"
      start kafka "''${kafka_java[@]}" -Xms256m -Xmx768m -Dkafka.logs.dir="$state/kafka" \
        kafka.Kafka "$state/kafka/server.properties"
      wait_until 120 kafka port_open ${port ports.kafka}
    else
      log "using the Kafka broker at $brokers"
    fi

    log "starting kminion"
    start kminion env KAFKA_BROKERS="$brokers" EXPORTER_PORT=${port ports.kminion} ${lib.getExe kminion}

    log "starting Prometheus"
    start prometheus ${lib.getExe prometheus} \
      --config.file=${prometheusConfig} \
      --storage.tsdb.path="$state/prometheus" \
      --web.listen-address=127.0.0.1:${port ports.prometheus}

    log "starting Grafana"
    mkdir -p "$state/grafana/provisioning/datasources" "$state/grafana/provisioning/dashboards" \
      "$state/grafana/provisioning/plugins" "$state/grafana/provisioning/alerting"
    cp ${grafanaDatasources} "$state/grafana/provisioning/datasources/prometheus.yaml"
    cp ${grafanaDashboards} "$state/grafana/provisioning/dashboards/kop.yaml"
    cat >"$state/grafana/grafana.ini" <<EOF
    [paths]
    data = $state/grafana/data
    logs = $state/grafana/logs
    plugins = $state/grafana/plugins
    provisioning = $state/grafana/provisioning
    [server]
    http_addr = 127.0.0.1
    http_port = ${port ports.grafana}
    [security]
    admin_user = admin
    admin_password = admin
    secret_key = $(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    [analytics]
    reporting_enabled = false
    check_for_updates = false
    check_for_plugin_updates = false
    [log]
    mode = console
    EOF
    start grafana ${lib.getExe grafana} server \
      --homepath ${grafana}/share/grafana --config "$state/grafana/grafana.ini"

    for name in order payment inventory notification; do
      log "starting kop-$name"
      # The environment overrides the shipped configuration (etc/kop/$name.toml).
      start "kop-$name" env KAFKA_BROKERS="$brokers" LOG_FORMAT=text \
        ${kop}/bin/kop-$name --config ${kop}/etc/kop/$name.toml
    done
    for entry in ${daemonPorts}; do
      wait_until 150 "kop-''${entry%%:*}" curl -sf -o /dev/null "http://127.0.0.1:''${entry#*:}/readyz"
    done
    wait_until 60 prometheus port_open ${port ports.prometheus}
    wait_until 120 grafana curl -sf -o /dev/null http://127.0.0.1:${port ports.grafana}/api/health

    cat <<EOF

    kop is running (state and logs in $state, removed on exit):
      order API    http://127.0.0.1:${port ports.daemons.order.api}/order   (POST, JSON)
      metrics      ${lib.concatMapStringsSep "  " (p: "http://127.0.0.1:${port p.metrics}/metrics") (lib.attrValues ports.daemons)}
      Prometheus   http://127.0.0.1:${port ports.prometheus}
      Grafana      http://127.0.0.1:${port ports.grafana}/d/kop   (admin / admin)
      kminion      http://127.0.0.1:${port ports.kminion}/metrics
      Kafka        $brokers

    Try:
      curl -X POST http://127.0.0.1:${port ports.daemons.order.api}/order -H 'Content-Type: application/json' -d '{"orderId":"o1","amount":42}'

    Ctrl-C stops everything.
    EOF

    # Until Ctrl-C, or until one of them exits.
    status=0
    wait -n || status=$?
    for i in "''${!pids[@]}"; do
      if ! kill -0 "''${pids[i]}" 2>/dev/null; then
        log "''${names[i]} exited; the end of its log:"
        tail -n 30 "$state/''${names[i]}.log" >&2 || true
      fi
    done
    exit $((status == 0 ? 1 : status))
  '';
}
