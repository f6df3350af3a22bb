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

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ (kopFor pkgs) ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            kcat
            prometheus
            jdk17
            maven
            pkg-config
            cmake
            openssl
          ];
          OPENSSL_NO_VENDOR = 1;
        };
      });
    };
}
