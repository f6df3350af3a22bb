# Several instances of a stage on one host (services.kop.<stage>.instances > 1): how the
# NixOS module names them, numbers their metrics ports and gives each its credentials.
# Instance N of kop-payment is kop-payment@N.service, from the template
# kop-payment@.service, as systemd/kop-payment@.service runs it outside NixOS.
#
# Plain data and functions, no nixpkgs: tests/offline/nix_files.rs evaluates this file with
# `nix-instantiate --eval` and checks it against systemd/kop-*@.service.
{ ports }:
rec {
  # The units of `count` instances of a stage (none when one kop-<name>.service will do).
  numbers = count: if count > 1 then builtins.genList (i: i + 1) count else [ ];
  unitName = name: n: "kop-${name}@${toString n}";

  # What systemd sets for the instance %i, as the template in systemd/ says: unique on the
  # host and, through the host name (%H), across hosts.
  instanceId = "%H-%i";

  # Instance N listens on the stage's base + N (ports.nix), unless the base is changed.
  metricsPort = base: n: base + n;

  # The instance's own environment file: the metrics port, which no setting derives from
  # the instance name.
  environment = base: n: "METRICS_PORT=${toString (metricsPort base n)}\n";

  # systemd.exec(5): a service's credentials are in /run/credentials/<unit>; an instance
  # is its own unit, so each has its own directory.
  credentialsDirectory = unit: "/run/credentials/${unit}.service";

  # The settings of instance N: every string that names the stage's credentials directory
  # (settings built from services.kop.<name>.credentialsDirectory) names the instance's.
  settingsOf =
    name: n: settings:
    let
      from = credentialsDirectory "kop-${name}";
      to = credentialsDirectory (unitName name n);
      rewrite =
        value:
        if builtins.isAttrs value then
          builtins.mapAttrs (_: rewrite) value
        else if builtins.isList value then
          map rewrite value
        else if builtins.isString value then
          builtins.replaceStrings [ from ] [ to ] value
        else
          value;
    in
    rewrite settings;

  # The metrics base of each stage's instances, the default of
  # services.kop.<name>.instanceMetricsPort.
  metricsBase = name: ports.instances.${name};
}
