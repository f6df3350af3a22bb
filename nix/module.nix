# NixOS module: services.kop — the four kop daemons as systemd services, each running a
# TOML configuration generated from `settings` and checked at build time by the daemon's
# own `--check-config`; `local.enable` adds a single-host Kafka (KRaft), Prometheus with
# kminion and Grafana. Secrets stay out of the Nix store: per daemon, `credentials` and
# `configFile` (systemd LoadCredential=) and `environmentFile` (EnvironmentFile=) name
# files that systemd reads when the daemon starts. Per daemon, `enable` leaves it out, and
# a stage's `instances` runs several on the host from a template unit (instances.nix).
#
# flake.nix imports this file as `nixosModules.default`, applied to the flake itself: the
# package option defaults to the flake's own package (no overlay, so it also works where
# `nixpkgs.*` is read-only, as in `pkgs.testers.runNixOSTest`).
{ self }:
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkDefault
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    types
    ;

  cfg = config.services.kop;
  toml = pkgs.formats.toml { };
  ports = import ./ports.nix;
  unit = import ./unit.nix;
  instances = import ./instances.nix { inherit ports; };

  names = [
    "order"
    "payment"
    "inventory"
    "notification"
  ];
  stages = [
    "payment"
    "inventory"
    "notification"
  ];
  unitName = name: "kop-${name}";
  enabled = builtins.filter (name: cfg.${name}.enable) names;

  # The instance numbers of a daemon: none when it runs as the one kop-<name>.service.
  instanceNumbers = name: if cfg.${name} ? instances then instances.numbers cfg.${name}.instances else [ ];
  # The units that kop.target wants for a daemon.
  unitsOf =
    name:
    if instanceNumbers name == [ ] then
      [ "${unitName name}.service" ]
    else
      map (n: "${instances.unitName name n}.service") (instanceNumbers name);

  # The daemon loads and validates the file as at start (TOML keys, values, topic names,
  # and the [kafka] table through librdkafka's own property check) without contacting a
  # broker. `env -i`: the environment overrides the file, so nothing of the builder's
  # may leak into the check.
  checkedToml =
    name: fileName: settings:
    let
      file = toml.generate fileName settings;
    in
    if cfg.checkConfig then
      pkgs.runCommand "checked-${fileName}" { } ''
        ${pkgs.coreutils}/bin/env -i \
          ${cfg.package}/bin/kop-${name} --check-config --config ${file}
        cp ${file} $out
      ''
    else
      file;

  checkedConfigFile = name: checkedToml name "kop-${name}.toml" cfg.settings.${name};

  # What the template kop-<name>@.service reads for instance %i: <n>.toml, its settings
  # with its own credentials directory, and <n>.env, its metrics port.
  instanceFiles =
    name:
    pkgs.linkFarm "kop-${name}-instances" (
      lib.concatMap (n: [
        {
          name = "${toString n}.toml";
          path = checkedToml name "kop-${name}-${toString n}.toml" (
            instances.settingsOf name n cfg.settings.${name}
          );
        }
        {
          name = "${toString n}.env";
          path = pkgs.writeText "kop-${name}-${toString n}.env" (
            instances.environment cfg.${name}.instanceMetricsPort n
          );
        }
      ]) (instanceNumbers name)
    );

  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));
  metricsPort =
    name:
    portOf (cfg.settings.${name}.metrics.listen or "0.0.0.0:${toString ports.daemons.${name}.metrics}");
  # Every metrics port in use: a daemon's, or each of its instances'.
  metricsPorts =
    name:
    if instanceNumbers name == [ ] then
      [ (metricsPort name) ]
    else
      map (instances.metricsPort cfg.${name}.instanceMetricsPort) (instanceNumbers name);
  allMetricsPorts = lib.concatMap metricsPorts enabled;
  apiPort = portOf (cfg.settings.order.http.listen or "0.0.0.0:${toString ports.daemons.order.api}");

  kafkaAfter = lib.optional cfg.local.enable "apache-kafka.service";

  # The address of the local platform's Kafka (local.enable), which listens on the
  # loopback address only, and the default of kafka.brokers: the same string.
  localKafka = "127.0.0.1:${toString ports.kafka}";

  # A file that systemd reads when the daemon starts. A string, not a Nix path: a path
  # literal such as ./kafka.key would be copied into the world-readable store, and a string
  # naming a store path is refused (lib.types.addCheck, as nixpkgs' lib/types.nix builds
  # its own checked types).
  runtimeFile =
    types.addCheck types.str (
      file:
      lib.hasPrefix "/" file
      && !lib.hasPrefix "${builtins.storeDir}/" file
      && !lib.hasInfix "\n" file
    )
    // {
      name = "runtimeFile";
      description = "absolute path outside the Nix store, as a string";
      descriptionClass = "noun";
    };

  # Where systemd puts the credentials of a system service: systemd.exec(5), "Credentials":
  # "the path may also be referenced as /run/credentials/UNITNAME in cases where no
  # interpolation is possible, e.g. configuration files" — as the TOML file is.
  credentialsDirectory = name: "/run/credentials/${unitName name}.service";

  # The credential under which `configFile` is handed over (as in README's drop-in).
  configCredential = name: "${name}.toml";

  # Per daemon: whether it runs, how many (a stage), and the files that never enter the
  # store.
  daemonOptions =
    name:
    {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Whether kop-${name} runs on this host (with {option}`services.kop.enable`). Off,
          it has no unit here and `kop.target` leaves it out: another host runs it, or none.
        '';
      };
    }
    // lib.optionalAttrs (builtins.elem name stages) {
      instances = mkOption {
        type = types.ints.positive;
        default = 1;
        example = 2;
        description = ''
          How many kop-${name} run on this host. One runs as `kop-${name}.service`; more
          run as `kop-${name}@1.service`, `kop-${name}@2.service`, ... from the template
          `kop-${name}@.service` (as systemd/kop-${name}@.service): members of one
          consumer group sharing the partitions of the input, each with its own
          transactional id (`KOP_INSTANCE_ID` = `<host name>-<N>`), metrics port
          ({option}`services.kop.${name}.instanceMetricsPort` + N) and credentials
          directory (`/run/credentials/kop-${name}@<N>.service`, which each instance's
          file names in place of {option}`services.kop.${name}.credentialsDirectory`).
          More instances than input partitions leave some idle.
        '';
      };

      instanceMetricsPort = mkOption {
        type = types.port;
        default = instances.metricsBase name;
        description = ''
          With {option}`services.kop.${name}.instances` above 1, instance N serves its
          metrics on this port + N (`METRICS_PORT`, in place of `metrics.listen`'s port).
        '';
      };
    }
    // secretOptions name;

  secretOptions = name: {
    credentials = mkOption {
      type = types.attrsOf runtimeFile;
      default = { };
      example = {
        "kafka.key" = "/run/keys/kop-kafka.key";
        "kafka.crt" = "/run/keys/kop-kafka.crt";
      };
      description = ''
        Files handed to kop-${name} as systemd credentials (`LoadCredential=<name>:<file>`):
        when the daemon starts, systemd (as root, so the file may be readable by root only)
        copies each file to
        {option}`services.kop.${name}.credentialsDirectory`/<name>, readable by the
        daemon's dynamic user only. Name that copy in `settings`, for librdkafka properties
        that take a file: `kafka."ssl.key.location"`, `"ssl.certificate.location"`,
        `"ssl.ca.location"`, `"sasl.kerberos.keytab"`. The paths are strings, so the files
        never enter the Nix store. A password (`sasl.password`) is not a file: use
        {option}`services.kop.${name}.configFile`.
      '';
    };

    credentialsDirectory = mkOption {
      type = types.str;
      readOnly = true;
      default = credentialsDirectory name;
      description = ''
        Where kop-${name} finds its {option}`services.kop.${name}.credentials` (read-only):
        `''${config.services.kop.${name}.credentialsDirectory}/kafka.key` in `settings`.
        Each instance of a stage run as several has its own directory, and its file
        names that one wherever `settings` name this.
      '';
    };

    configFile = mkOption {
      type = types.nullOr runtimeFile;
      default = null;
      example = "/run/keys/kop-${name}.toml";
      description = ''
        The whole configuration of kop-${name} (a TOML file with the keys of
        etc/kop/${name}.toml) from a file outside the Nix store, for what must not be in
        the world-readable store, such as `kafka."sasl.password"`. Handed over as the
        credential `${configCredential name}` and run with
        `--config ''${CREDENTIALS_DIRECTORY}/${configCredential name}`, instead of the file
        generated from `settings.${name}`, which then has no effect and nothing is checked
        at build time: the daemon checks the file when it starts and exits 78 on an error.
        systemd copies the file at each start: a change applies on restart, not on reload.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr runtimeFile;
      default = null;
      example = "/run/keys/kop-${name}.env";
      description = ''
        An `EnvironmentFile=` of kop-${name} (`NAME=value` lines), read by systemd (as root)
        when the daemon starts, never copied into the Nix store. The variables override the
        configuration as the README's table says (`KAFKA_BROKERS`, `KOP_INSTANCE_ID`,
        `LOG_LEVEL`, …). No librdkafka property comes from the environment: a password or
        key goes in {option}`services.kop.${name}.configFile` or
        {option}`services.kop.${name}.credentials`.
      '';
    };
  };

  # LoadCredential= lines of a daemon: its credentials, and its configFile if any.
  loadCredentials =
    name:
    let
      daemon = cfg.${name};
    in
    lib.mapAttrsToList (id: file: "${id}:${file}") (
      daemon.credentials
      // lib.optionalAttrs (daemon.configFile != null) { ${configCredential name} = daemon.configFile; }
    );

  # systemd.exec(5): "The ID must be a short ASCII string suitable as filename".
  credentialAssertions =
    name:
    let
      daemon = cfg.${name};
    in
    map (id: {
      assertion = builtins.match "[A-Za-z0-9_.@-]+" id != null && id != "." && id != "..";
      message = "services.kop.${name}.credentials: `${id}` is not a credential name (letters, digits, `_.@-`).";
    }) (builtins.attrNames daemon.credentials)
    ++ [
      {
        assertion = daemon.configFile == null || !(daemon.credentials ? ${configCredential name});
        message = "services.kop.${name}: the credential `${configCredential name}` is services.kop.${name}.configFile; give the other one another name.";
      }
    ];

  settingsOption =
    name:
    mkOption {
      type = types.submodule { freeformType = toml.type; };
      default = { };
      example = literalExpression ''
        {
          log.level = "info,kop=debug";
          kafka."security.protocol" = "SSL";
          ${lib.optionalString (name != "order") ''retry.delays = [ "1s" "10s" "1m" ];''}
        }
      '';
      description = ''
        Configuration of kop-${name}, rendered to TOML: the sections and keys of
        etc/kop/${name}.toml (the shipped defaults, commented). Keys left out keep the
        daemon's built-in defaults; `kafka."bootstrap.servers"` defaults to
        {option}`services.kop.kafka.brokers`. Checked at build time with
        `kop-${name} --check-config`.
      '';
    };
in
{
  options.services.kop = lib.genAttrs names daemonOptions // {
    enable = mkEnableOption "kop, the Kafka Order Platform (kop-order, kop-payment, kop-inventory, kop-notification)";

    package = mkOption {
      type = types.package;
      default =
        self.packages.${pkgs.stdenv.hostPlatform.system}.default or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "kop.packages.\${system}.default";
      description = "The kop package (daemons and kopctl).";
    };

    kafka.brokers = mkOption {
      type = types.str;
      # What local.enable starts: its Kafka listens on 127.0.0.1 only (not on ::1, which
      # "localhost" may resolve to first).
      default = localKafka;
      example = "kafka1:9092,kafka2:9092";
      description = ''
        Kafka bootstrap servers (`host:port`, comma-separated) of all four daemons: the
        default of `settings.<daemon>.kafka."bootstrap.servers"`. The default is the
        Kafka of {option}`services.kop.local.enable`, on the loopback address.
      '';
    };

    settings = lib.genAttrs names settingsOption;

    checkConfig = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = ''
        Check each generated configuration at build time with the daemon's own
        `--check-config` (it has to run on the build machine).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the order API port and the four metrics ports in the firewall.";
    };

    local.enable = mkEnableOption ''
      a single-host platform: Apache Kafka in KRaft mode (broker and controller in one
      JVM, replication factor 1) on 127.0.0.1:9092, Prometheus on 127.0.0.1:9090 scraping
      the daemons and kminion (the Kafka exporter, :9308) with the rules of
      docker/prometheus/alerts.yml, and Grafana on 127.0.0.1:3000 (admin/admin) with the
      kop dashboard. For development and tests: the Grafana secret key is a constant in the
      Nix store'';
  };

  config = mkIf cfg.enable (mkMerge [
    {
      services.kop.settings = lib.genAttrs names (_: {
        kafka."bootstrap.servers" = mkDefault cfg.kafka.brokers;
      });

      environment.systemPackages = [ cfg.package ];

      assertions =
        lib.concatMap credentialAssertions names
        ++ [
          {
            assertion = lib.unique allMetricsPorts == allMetricsPorts;
            message = "services.kop: two daemons or instances share a metrics port (${toString allMetricsPorts}); set services.kop.<name>.instanceMetricsPort or settings.<name>.metrics.listen.";
          }
        ];

      systemd.services = lib.listToAttrs (
        map (
          name:
          let
            daemon = cfg.${name};
            several = instanceNumbers name != [ ];
            files = instanceFiles name;
            configPath =
              if daemon.configFile != null then
                # Expanded by systemd, as in README's LoadCredential= drop-in.
                "\${CREDENTIALS_DIRECTORY}/${configCredential name}"
              else if several then
                # %i: each instance its own file (instances.nix).
                "${files}/%i.toml"
              else
                checkedConfigFile name;
          in
          # A template is named "kop-<name>@" here (kop-<name>@.service); kop.target wants
          # its instances by name, which systemd instantiates from it.
          lib.nameValuePair (if several then "${unitName name}@" else unitName name) {
            description = "kop ${name} daemon" + lib.optionalString several ", instance %i";
            # An instance is wanted by kop.target (below); a template cannot be.
            wantedBy = lib.optional (!several) "kop.target";
            partOf = [ "kop.target" ];
            wants = [ "network-online.target" ] ++ kafkaAfter;
            after = [ "network-online.target" ] ++ kafkaAfter;
            environment = mkIf several { KOP_INSTANCE_ID = instances.instanceId; };
            # The [Service] section of systemd/kop-${name}.service (see unit.nix); each
            # setting can be overridden without mkForce.
            serviceConfig = lib.mapAttrs (_: mkDefault) (removeAttrs unit.serviceConfig [ "Type" ]) // {
              Type = "notify";
              ExecStart = "${cfg.package}/bin/kop-${name} --config ${configPath}";
              # SIGHUP re-reads the configuration (log level, [simulate]).
              ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
              # Read by systemd when the daemon starts; never in the store.
              LoadCredential = mkIf (loadCredentials name != [ ]) (loadCredentials name);
              # The instance's metrics port first: a later file overrides an earlier one.
              EnvironmentFile = mkIf (several || daemon.environmentFile != null) (
                lib.optional several "${files}/%i.env"
                ++ lib.optional (daemon.environmentFile != null) daemon.environmentFile
              );
            };
          }
        ) enabled
      );

      systemd.targets.kop = {
        description = "kop, the Kafka Order Platform (all four daemons)";
        wantedBy = [ "multi-user.target" ];
        wants = lib.concatMap unitsOf enabled;
        after = lib.concatMap unitsOf enabled;
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
        lib.optional (cfg.order.enable) apiPort ++ allMetricsPorts
      );
    }

    (mkIf cfg.local.enable {
      # Facts from nixpkgs' nixos/tests/kafka/base.nix (KRaft), plus what transactions on
      # one broker need (transaction.state.log.*).
      services.apache-kafka = {
        enable = true;
        # A fixed cluster id (kafka-storage.sh random-uuid) for the first format.
        clusterId = mkDefault "75Rf8n7XTqGMgrmpLj8FYg";
        formatLogDirs = true;
        jvmOptions = mkDefault [
          "-Xms256m"
          "-Xmx768m"
        ];
        settings = lib.mapAttrs (_: mkDefault) {
          "node.id" = 1;
          "process.roles" = [
            "broker"
            "controller"
          ];
          listeners = [
            "PLAINTEXT://${localKafka}"
            "CONTROLLER://127.0.0.1:${toString ports.kafkaController}"
          ];
          "advertised.listeners" = [ "PLAINTEXT://${localKafka}" ];
          "listener.security.protocol.map" = [
            "PLAINTEXT:PLAINTEXT"
            "CONTROLLER:PLAINTEXT"
          ];
          "inter.broker.listener.name" = "PLAINTEXT";
          "controller.quorum.voters" = [ "1@127.0.0.1:${toString ports.kafkaController}" ];
          "controller.listener.names" = [ "CONTROLLER" ];
          "log.dirs" = [ "/var/lib/apache-kafka" ];
          # The daemons create their topics; nothing else should.
          "auto.create.topics.enable" = false;
          "offsets.topic.replication.factor" = 1;
          "offsets.topic.num.partitions" = 10;
          "transaction.state.log.replication.factor" = 1;
          "transaction.state.log.min.isr" = 1;
          "transaction.state.log.num.partitions" = 10;
          "share.coordinator.state.topic.replication.factor" = 1;
          "share.coordinator.state.topic.min.isr" = 1;
          "group.initial.rebalance.delay.ms" = 0;
        };
      };

      # kminion, nixpkgs' Kafka exporter (metrics kminion_*). It reads its settings from
      # the environment and ignores the module's port option.
      services.prometheus.exporters.kafka = {
        enable = true;
        port = ports.kminion;
      };
      systemd.services.prometheus-kafka-exporter.environment = {
        KAFKA_BROKERS = cfg.kafka.brokers;
        EXPORTER_PORT = toString ports.kminion;
      };

      services.prometheus = {
        enable = true;
        listenAddress = mkDefault "127.0.0.1";
        port = ports.prometheus;
        globalConfig = {
          scrape_interval = "5s";
          evaluation_interval = "5s";
        };
        scrapeConfigs = import ./scrape.nix {
          inherit ports;
          kopPorts = allMetricsPorts;
        };
        # promtool checks them when the system is built.
        ruleFiles = [ ../docker/prometheus/alerts.yml ];
      };

      services.grafana = {
        enable = true;
        settings = {
          server = {
            http_addr = mkDefault "127.0.0.1";
            http_port = ports.grafana;
          };
          security = {
            admin_user = mkDefault "admin";
            admin_password = mkDefault "admin";
            # Required by current nixpkgs; a constant is fine for a development host only.
            secret_key = mkDefault "kop-local-only-7f3c9a1e5b2d4c8f";
          };
          analytics.reporting_enabled = false;
        };
        provision = {
          enable = true;
          # As docker/grafana/provisioning: the dashboard refers to the datasource by uid.
          datasources.settings = {
            apiVersion = 1;
            datasources = [
              {
                name = "Prometheus";
                uid = "prometheus";
                type = "prometheus";
                access = "proxy";
                url = "http://127.0.0.1:${toString ports.prometheus}";
                isDefault = true;
                jsonData.timeInterval = "5s";
              }
            ];
          };
          dashboards.settings = {
            apiVersion = 1;
            providers = [
              {
                name = "kop";
                folder = "kop";
                type = "file";
                disableDeletion = true;
                options.path = ../docker/grafana/dashboards;
              }
            ];
          };
        };
      };
    })
  ]);
}
