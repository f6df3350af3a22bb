# The [Service] section shared by the four units in systemd/ (kop-<name>.service) and the
# stages' templates (kop-<name>@.service), as NixOS `serviceConfig`. The NixOS module adds
# ExecStart and ExecReload (store paths), LoadCredential= and EnvironmentFile= from its
# per-daemon options (the units show them as commented drop-in lines), and a template's
# instance settings (instances.nix).
#
# Plain data, no nixpkgs: tests/offline/nix_files.rs evaluates this file with
# `nix-instantiate --eval` and fails when it differs from the [Service] section of any
# systemd/kop-*.service (ExecStart, ExecReload and ConfigurationDirectory aside: the
# module runs a store path on a generated, checked file from the store, not /etc/kop; and
# a template's Environment= and EnvironmentFile=). Change both together.
{
  serviceConfig = {
    Type = "notify";
    NotifyAccess = "main";
    # WATCHDOG=1 comes from the daemon's processing loop; a stuck loop is restarted.
    WatchdogSec = "10s";
    # The daemon waits for Kafka with back-off before READY=1.
    TimeoutStartSec = "2min";
    # SIGTERM drains: finish and commit the batch in progress, flush, exit 0.
    TimeoutStopSec = "30s";
    Restart = "on-failure";
    RestartSec = "2s";
    # 78 (EX_CONFIG): the configuration is wrong, restarting will not help.
    RestartPreventExitStatus = 78;
    # kop-order holds up to http.max_connections (4096) client connections.
    LimitNOFILE = 16384;

    # Sandbox: a Kafka client and an HTTP server that writes nothing.
    DynamicUser = true;
    UMask = "0077";
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateUsers = true;
    PrivateMounts = true;
    DevicePolicy = "closed";
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    # Not ProcSubset = "pid": process_start_time_seconds needs /proc/stat.
    ProtectProc = "invisible";
    # Kafka and HTTP; journald and sd_notify.
    RestrictAddressFamilies = "AF_INET AF_INET6 AF_UNIX";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    KeyringMode = "private";
    SystemCallArchitectures = "native";
    # A list becomes one SystemCallFilter= line per element, as in the unit files.
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
  };
}
