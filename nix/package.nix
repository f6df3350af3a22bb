# kop: the four daemons (kop-order, kop-payment, kop-inventory, kop-notification) and
# kopctl, their systemd units (lib/systemd/system) and the commented default
# configurations (etc/kop). Called by flake.nix with `pkgs.callPackage`.
{
  lib,
  rustPlatform,
  coreutils,
  pkg-config,
  cmake,
  perl,
  python3,
  openssl,
  zlib,
}:

let
  fs = lib.fileset;
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  # Only what cargo and the install step read: a change to the README, docker/ or nix/
  # does not rebuild the package. tests/ is there for the fmt and clippy checks; harness/
  # and xtask/ because cargo loads every member of the workspace (only kop is built, the
  # root package being the default member); benchmark directories are taken when they
  # exist (a [[bench]] in Cargo.toml needs its file).
  src = fs.toSource {
    root = ../.;
    fileset = fs.unions (
      [
        ../Cargo.toml
        ../Cargo.lock
        ../src
        ../etc
        ../systemd
        ../tests
        ../harness
        ../xtask
      ]
      ++ builtins.filter builtins.pathExists [
        (../. + "/benches")
        (../. + "/bench")
      ]
    );
  };

  cargoLock.lockFile = ../Cargo.lock;

  # rdkafka (features ssl, libz) builds its bundled librdkafka with librdkafka's own
  # `configure` (mklove) and `make`: pkg-config finds OpenSSL and zlib, python3 runs the
  # linker-script generator. cmake (as in nixpkgs' tremor-rs) and perl are for the
  # crates' other build paths (rdkafka's cmake-build feature, a vendored OpenSSL).
  nativeBuildInputs = [
    pkg-config
    cmake
    perl
    python3
  ];
  buildInputs = [
    openssl
    zlib
  ];
  # openssl-sys: link nixpkgs' OpenSSL, never build a vendored copy.
  OPENSSL_NO_VENDOR = 1;

  # The vendored librdkafka sources start their scripts with "#!/usr/bin/env bash",
  # "#!/bin/bash" and "#!/usr/bin/env python3", which do not exist in the build sandbox;
  # rdkafka-sys copies the tree (cp -a) into OUT_DIR and runs ./configure from there.
  # $cargoDepsCopy is the writable copy of the vendored crates (cargoSetupHook).
  postPatch = ''
    rdkafka_trees=( "$cargoDepsCopy"/rdkafka-sys-*/librdkafka )
    if [ ! -x "''${rdkafka_trees[0]}/configure" ]; then
      echo "rdkafka-sys not found in $cargoDepsCopy" >&2
      exit 1
    fi
    patchShebangs --build "''${rdkafka_trees[@]}"
  '';

  # Only the library's unit tests: the integration tests in tests/ need a Kafka broker
  # (the VM test, checks.<system>.vm, runs the daemons against a real one).
  cargoTestFlags = [ "--lib" ];

  postInstall = ''
    install -Dm644 -t $out/lib/systemd/system systemd/*.service systemd/*.target
    for unit in $out/lib/systemd/system/kop-*.service; do
      substituteInPlace "$unit" \
        --replace-fail "ExecStart=/usr/bin/kop-" "ExecStart=$out/bin/kop-" \
        --replace-quiet "ExecReload=/bin/kill " "ExecReload=${coreutils}/bin/kill "
    done
    install -Dm644 -t $out/etc/kop etc/kop/*.toml
  '';

  meta = {
    description = "Kafka Order Platform: exactly-once order pipeline daemons over Apache Kafka";
    mainProgram = "kopctl";
    platforms = lib.platforms.linux;
  };
}
