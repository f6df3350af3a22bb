use std::path::Path;

use super::common::instance_id;
use super::*;

fn env(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
    pairs.iter().copied().collect()
}

fn write(text: &str) -> (tempdir::Dir, PathBuf) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("kop.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "kop-config-test-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn defaults_without_a_file_match_the_original() {
    let c = StageConfig::load(Service::Payment, None, &env(&[])).unwrap();
    assert_eq!(c.input, "orders.created");
    assert_eq!(c.retry_topic, "orders.created.retry");
    assert_eq!(c.dlq_topic, "orders.created.dlq");
    assert_eq!(c.output.as_deref(), Some("payments.completed"));
    assert_eq!(c.common.metrics_listen.port(), 9104);
    assert_eq!(c.common.kafka["bootstrap.servers"], "localhost:9092");
    assert_eq!(c.retry.max_attempts, 3);
    assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
    let o = OrderConfig::load(None, &env(&[])).unwrap();
    assert_eq!(o.listen.port(), 4000);
    assert_eq!(o.common.metrics_listen.port(), 9100);
    assert_eq!(Ok(c.common.instance_id), host_name());
    let n = StageConfig::load(Service::Notification, None, &env(&[])).unwrap();
    assert_eq!(n.output, None);
    assert_eq!(n.common.metrics_listen.port(), 9103);
}

#[test]
fn environment_overrides_with_the_original_names() {
    let e = env(&[
        ("KAFKA_BROKERS", "k1:9092,k2:9092"),
        ("PAYMENT_COMPLETED_TOPIC", "pay"),
        ("INVENTORY_RESERVED_TOPIC", "inv"),
        ("PAYMENT_GROUP_ID", "g"),
        ("MAX_PROCESSING_ATTEMPTS", "5"),
        ("RETRY_DELAYS_MS", "10, 20"),
        ("METRICS_PORT", "19102"),
        ("SERVICE_NAME", "inv-a"),
    ]);
    let c = StageConfig::load(Service::Inventory, None, &e).unwrap();
    assert_eq!(c.input, "pay");
    assert_eq!(c.retry_topic, "pay.retry");
    assert_eq!(c.output.as_deref(), Some("inv"));
    assert_eq!(c.group_id, "inv-a");
    assert_eq!(c.common.kafka["bootstrap.servers"], "k1:9092,k2:9092");
    assert_eq!(c.retry.max_attempts, 5);
    assert_eq!(c.retry.delay_after(1), Duration::from_millis(10));
    assert_eq!(c.retry.delay_after(7), Duration::from_millis(20));
    assert_eq!(c.common.metrics_listen.port(), 19102);
    let (_dir, path) = write("[stage]\ninput = \"a\"\nretry_topic = \"a.r\"\n");
    let c = StageConfig::load(Service::Inventory, Some(&path), &env(&[])).unwrap();
    assert_eq!(c.retry_topic, "a.r");
    assert_eq!(c.dlq_topic, "a.dlq");
    let e = env(&[("PAYMENT_COMPLETED_TOPIC", "b")]);
    let c = StageConfig::load(Service::Inventory, Some(&path), &e).unwrap();
    assert_eq!(
        c.retry_topic, "b.retry",
        "the retry topic follows an input renamed by env"
    );
}

#[test]
fn shipped_files_hold_the_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/kop");
    let e = env(&[]);
    assert_eq!(
        OrderConfig::load(Some(&root.join("order.toml")), &e)
            .unwrap()
            .listen,
        OrderConfig::load(None, &e).unwrap().listen
    );
    for service in [Service::Payment, Service::Inventory, Service::Notification] {
        let path = root.join(format!("{}.toml", service.short_name()));
        let mut from_file = StageConfig::load(service, Some(&path), &e).unwrap();
        let defaults = StageConfig::load(service, None, &e).unwrap();
        from_file.common.origin = Origin::Defaults;
        assert_eq!(from_file, defaults, "{}", path.display());
    }
    let mut from_file = OrderConfig::load(Some(&root.join("order.toml")), &e).unwrap();
    from_file.common.origin = Origin::Defaults;
    assert_eq!(from_file, OrderConfig::load(None, &e).unwrap());
}

fn error_of(text: &str, e: &[(&'static str, &'static str)]) -> String {
    let (_dir, path) = write(text);
    StageConfig::load(Service::Payment, Some(&path), &env(e))
        .unwrap_err()
        .to_string()
}

#[test]
fn a_log_level_must_be_a_level() {
    for good in [
        "info",
        "WARN",
        "info,kop=debug",
        "kop::stage=trace,warn",
        "off",
        "3",
    ] {
        assert_eq!(check_log_filter(good), Ok(()), "{good}");
    }
    let msg = error_of("", &[("LOG_LEVEL", "warning")]);
    assert!(msg.contains("LOG_LEVEL"), "{msg}");
    assert!(!msg.contains("kop.toml"), "blames the file: {msg}");
    assert!(msg.contains("did you mean `warn`"), "{msg}");
    let msg = error_of("[log]\nlevel = \"verbose\"\n", &[]);
    assert!(
        msg.contains("kop.toml") && msg.contains("log.level"),
        "{msg}"
    );
    assert!(msg.contains("`verbose` is not a level"), "{msg}");
}

#[test]
fn the_instance_id_defaults_to_the_host_name() {
    fn host() -> Result<String, String> {
        Ok("node-7.example".into())
    }
    fn no_host() -> Result<String, String> {
        Err("/proc/sys/kernel/hostname holds no host name".into())
    }
    // The id as the file and the environment left it, and where it came from.
    let layered = |e: &[(&'static str, &'static str)], from_file: Option<&str>| {
        let mut table = toml::Table::new();
        if let Some(id) = from_file {
            let mut service = toml::Table::new();
            service.insert("instance_id".into(), id.into());
            table.insert("service".into(), service.into());
        }
        let file = Origin::File("kop.toml".into());
        let sources = env::layer(Service::Payment, &mut table, file, &env(e)).unwrap();
        let id = table
            .get("service")
            .and_then(|s| s.get("instance_id"))
            .map(|id| id.as_str().unwrap().to_string());
        (id, sources)
    };
    let id = |e: &[(&'static str, &'static str)], from_file: Option<&str>| {
        let (id, sources) = layered(e, from_file);
        instance_id(id, &sources, host)
    };
    assert_eq!(id(&[], None).unwrap(), "node-7.example");
    assert_eq!(id(&[], Some("a")).unwrap(), "a");
    assert_eq!(id(&[("KOP_INSTANCE_ID", "b")], Some("a")).unwrap(), "b");

    let msg = id(&[("KOP_INSTANCE_ID", "two words")], Some("a"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("environment variable KOP_INSTANCE_ID: `two words`"),
        "{msg}"
    );
    let msg = id(&[], Some("a/b")).unwrap_err().to_string();
    assert!(
        msg.starts_with("kop.toml: key `service.instance_id`: `a/b` is not"),
        "{msg}"
    );
    let (_, sources) = layered(&[], None);
    let msg = instance_id(None, &sources, || Ok("höst".into()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`höst` (the host name, the default)")
            && msg.contains("set service.instance_id or KOP_INSTANCE_ID"),
        "{msg}"
    );
    let msg = instance_id(None, &sources, no_host)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("service.instance_id") && msg.contains("holds no host name"),
        "{msg}"
    );
    // Without a host name, a set id is all it takes.
    assert_eq!(
        instance_id(Some("a".into()), &sources, no_host).unwrap(),
        "a"
    );
}

#[test]
fn errors_name_the_file_and_the_key() {
    let msg = error_of("[retry]\nmax_atempts = 3\n", &[]);
    assert!(
        msg.contains("kop.toml") && msg.contains("max_atempts"),
        "{msg}"
    );
    let msg = error_of("[retry]\nmax_attempts = \"three\"\n", &[]);
    assert!(msg.contains("retry.max_attempts"), "{msg}");
    let msg = error_of("[stage]\ncommit_interval = \"soon\"\n", &[]);
    assert!(
        msg.contains("stage.commit_interval") && msg.contains("soon"),
        "{msg}"
    );
    let msg = error_of("[kafka]\n\"no.such.property\" = 1\n", &[]);
    assert!(msg.contains("no.such.property"), "{msg}");
    let msg = error_of("[simulate]\nfailure_rate = 1.5\n", &[]);
    assert!(msg.contains("simulate.failure_rate"), "{msg}");
    let msg = error_of("", &[("MAX_PROCESSING_ATTEMPTS", "x")]);
    assert!(msg.contains("MAX_PROCESSING_ATTEMPTS"), "{msg}");
    let msg = error_of("[stage\n", &[]);
    assert!(msg.contains("kop.toml"), "{msg}");
}

/// Checks made after the merge blame where the value came from: the variable when one set
/// it, even over the file's value.
#[test]
fn a_bad_value_from_a_variable_names_the_variable() {
    let file = "[retry]\nmax_attempts = 3\n[simulate]\nfailure_rate = 0.5\n";
    for (var, value, says) in [
        ("MAX_PROCESSING_ATTEMPTS", "0", "must be at least 1"),
        ("MAX_PROCESSING_ATTEMPTS", "5000000000", "expected u32"),
        ("SIMULATE_FAILURE_RATE", "2", "not between 0 and 1"),
        ("PROCESSING_GUARANTEE", "maybe-once", "at-least-once"),
        ("LOG_FORMAT", "xml", "journald"),
        ("METRICS_PORT", "65536", "too large"),
        ("ORDER_RETRY_TOPIC", "a b", "not a legal Kafka topic name"),
    ] {
        let msg = error_of(file, &[(var, value)]);
        assert!(
            msg.starts_with(&format!("environment variable {var}: ")),
            "{var}={value}: {msg}"
        );
        assert!(msg.contains(value) && msg.contains(says), "{msg}");
        assert!(!msg.contains("kop.toml"), "blames the file: {msg}");
    }
    // A default made of a variable's value is that variable's.
    let long: &'static str = "t".repeat(245).leak();
    let msg = error_of("", &[("ORDER_TOPIC", long)]);
    assert!(
        msg.starts_with("environment variable ORDER_TOPIC: ") && msg.contains(".retry"),
        "{msg}"
    );
    let msg = error_of("", &[("SERVICE_NAME", "a b")]);
    assert!(
        msg.starts_with("environment variable SERVICE_NAME: ") && msg.contains("dedup-changelog"),
        "{msg}"
    );
}

#[test]
fn a_bad_value_from_the_file_names_file_and_key() {
    for (text, key) in [
        ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
        ("[simulate]\nfailure_rate = -1.0\n", "simulate.failure_rate"),
        (
            "[stage]\nprocessing_guarantee = \"maybe\"\n",
            "stage.processing_guarantee",
        ),
        ("[stage]\ndlq_topic = \"a b\"\n", "stage.dlq_topic"),
        ("[dedup]\nwindow = \"10ms\"\n", "dedup.window"),
        ("[topics]\npartitions = 0\n", "topics.partitions"),
        ("[http]\nlisten = \"0.0.0.0:1\"\n", "http"),
    ] {
        // A variable for another key changes nothing.
        let msg = error_of(text, &[("PAYMENT_GROUP_ID", "g"), ("METRICS_PORT", "1")]);
        assert!(msg.contains("kop.toml: key `"), "{text}: {msg}");
        assert!(msg.contains(key), "{text}: {msg}");
        assert!(!msg.contains("environment variable"), "{msg}");
    }
    // A variable over a value of the wrong type does not hide the file's mistake.
    let msg = error_of(
        "[retry]\nmax_attempts = \"three\"\n",
        &[("MAX_PROCESSING_ATTEMPTS", "5")],
    );
    assert!(msg.contains("kop.toml: key `retry.max_attempts`"), "{msg}");
    // A port from a variable keeps the file's address; a bad address stays the file's.
    let (_dir, path) = write("[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let e = env(&[("METRICS_PORT", "2")]);
    let c = StageConfig::load(Service::Payment, Some(&path), &e).unwrap();
    assert_eq!(c.common.metrics_listen, "127.0.0.1:2".parse().unwrap());
    let msg = error_of("[metrics]\nlisten = \"here\"\n", &[("METRICS_PORT", "2")]);
    assert!(msg.contains("kop.toml: key `metrics.listen`"), "{msg}");
}

#[test]
fn a_default_is_used_when_neither_file_nor_variable_sets_it() {
    let (_dir, path) = write("[stage]\nmax_in_flight = 7\n[retry]\ndelays = [\"2s\"]\n");
    let c = StageConfig::load(Service::Inventory, Some(&path), &env(&[])).unwrap();
    assert_eq!(c.max_in_flight, 7);
    assert_eq!(c.commit_max_records, 5000);
    assert_eq!(c.stall_timeout, Duration::from_secs(60));
    assert_eq!(c.retry.max_attempts, 3);
    assert_eq!(c.retry.delays, [Duration::from_secs(2)]);
    assert_eq!(c.input, "payments.completed");
    assert_eq!(c.group_id, "inventory-service");
    assert_eq!(c.dedup.changelog, "inventory-service.dedup-changelog");
    assert!(!c.dedup.enabled);
    assert_eq!(c.common.metrics_listen.port(), 9102);
    assert_eq!(c.common.topics, TopicsConfig::default());
    assert_eq!(c.common.simulate, SimulateConfig::default());
    assert_eq!(c.common.log, LogConfig::default());
    assert!(
        StageConfig::load(Service::Payment, None, &env(&[]))
            .unwrap()
            .dedup
            .enabled
    );
    let e = env(&[("SERVICE_NAME", "s")]);
    let c = StageConfig::load(Service::Inventory, Some(&path), &e).unwrap();
    assert_eq!(c.dedup.changelog, "s.dedup-changelog");
    let o = OrderConfig::load(None, &env(&[("PORT", "8080")])).unwrap();
    assert_eq!(o.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(o.topic, "orders.created");
    assert_eq!(o.max_pending, 100_000);
}
