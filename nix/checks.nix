# Lint checks on the package's own source, as scripts/test.sh runs them:
# `cargo fmt --check` and `cargo clippy --workspace --all-targets -- -D warnings`.
# (The versions of rustfmt and clippy are nixpkgs', not the toolchain of scripts/test.sh:
# a lint new in nixpkgs' clippy fails this check first.)
{ pkgs, kop }:
{
  fmt =
    pkgs.runCommand "kop-fmt-check"
      {
        nativeBuildInputs = [
          pkgs.cargo
          pkgs.rustfmt
        ];
      }
      ''
        cp -r ${kop.src} source
        chmod -R u+w source
        cd source
        export HOME=$TMPDIR
        cargo fmt --all -- --check
        mkdir $out
      '';

  # The package's derivation (same vendored crates and patched librdkafka sources) with
  # clippy as its build and nothing installed.
  clippy = kop.overrideAttrs (old: {
    pname = "${old.pname}-clippy";
    nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
    buildPhase = ''
      runHook preBuild
      cargo clippy --offline --workspace --all-targets -- -D warnings
      runHook postBuild
    '';
    doCheck = false;
    installPhase = ''
      mkdir $out
    '';
  });
}
