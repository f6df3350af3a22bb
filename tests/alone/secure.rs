//! Authenticated, encrypted Kafka: a broker whose only client listener is SASL_SSL with
//! SCRAM-SHA-512 (cargo xtask kafka start --sasl-ssl), certificates made here with the
//! `openssl` CLI. Every daemon is configured through its `[kafka]` table alone; orders flow
//! end to end, and clients without the right credentials are refused.
//!
//! The test runs a broker of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::support::*;

const USER: &str = "kop";
const ORDERS: usize = 100;

/// A CA, a broker certificate for 127.0.0.1/localhost signed by it, and the SCRAM user.
struct Certs {
    dir: PathBuf,
    ca: String,
    password: String,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): this test needs the openssl CLI (Debian: apt-get install openssl)")
        });
    assert!(
        output.status.success(),
        "openssl {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes what `cargo xtask kafka start --sasl-ssl DIR` wants: broker-key.pem (unencrypted PKCS#8),
/// broker-cert.pem and users; plus ca.pem, which the clients trust.
fn make_certs() -> Certs {
    let dir = std::env::temp_dir().join(unique("kop-secure-certs"));
    std::fs::create_dir_all(&dir).expect("certs dir");
    let certs = Certs {
        ca: dir.join("ca.pem").to_string_lossy().into_owned(),
        password: format!("kop-{:016x}", rand::random::<u64>()),
        dir,
    };
    let dir = certs.dir.as_path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=kop test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-keyout",
                "broker-key.pem",
                "-out",
                "broker.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("broker.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("broker.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "broker-cert.pem",
            "-days",
            "2",
            "-extfile",
            "broker.ext",
        ],
    );
    std::fs::write(dir.join("users"), format!("{USER}:{}\n", certs.password)).expect("users");
    certs
}

/// The SASL_SSL broker of this test: its only client listener wants SCRAM logins over TLS.
fn start_secure_broker(certs: &Path) -> OwnBroker {
    OwnBroker::start_with(
        std::env::temp_dir().join(unique("kop-secure-broker")),
        StartOptions {
            port: Some(0),
            sasl_ssl: Some(certs.to_path_buf()),
            ..StartOptions::default()
        },
    )
}

/// The `[kafka]` properties of a SASL_SSL client: what an operator writes.
fn sasl_ssl_properties<'a>(certs: &'a Certs, password: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", USER),
        ("sasl.password", password),
        ("ssl.ca.location", &certs.ca),
    ]
}

fn kafka_toml(properties: &[(&str, &str)]) -> String {
    let mut toml = String::from("[kafka]\n");
    for (key, value) in properties {
        toml.push_str(&format!("\"{key}\" = \"{value}\"\n"));
    }
    toml
}

fn client_config(address: &str, properties: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", address);
    for (key, value) in properties {
        config.set(*key, *value);
    }
    config
}

/// Collects what librdkafka reports: errors, and log lines down to level info.
#[derive(Default)]
struct Capture {
    reports: Mutex<Vec<String>>,
}

impl ClientContext for Capture {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Info as i32) {
            self.reports
                .lock()
                .unwrap()
                .push(format!("log {fac}: {message}"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reports
            .lock()
            .unwrap()
            .push(format!("error {error}: {reason}"));
    }
}

impl ProducerContext for Capture {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A client that must not get in: its metadata request fails, and librdkafka says why.
/// Returns the first report that contains every string of `expected`.
fn refused(what: &str, mut config: ClientConfig, expected: &[&str]) -> String {
    config.set_log_level(RDKafkaLogLevel::Info);
    let client: BaseProducer<Capture> = config
        .create_with_context(Capture::default())
        .expect("client");
    let metadata = client.client().fetch_metadata(None, Duration::from_secs(5));
    assert!(
        metadata.is_err(),
        "{what}: a client without valid credentials got the metadata"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        client.poll(Duration::from_millis(100));
        let reports = client.context().reports.lock().unwrap().clone();
        if let Some(report) = reports
            .iter()
            .find(|r| expected.iter().all(|e| r.contains(e)))
        {
            return report.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no report containing {expected:?}; got {reports:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_flow_over_sasl_ssl_and_clients_without_credentials_are_refused() {
    let _turn = crate::take_turn().await;
    // The suite's broker must exist too: this suite never runs without one.
    let _ = brokers();
    let started = Instant::now();
    let certs = make_certs();
    let broker = start_secure_broker(&certs.dir);
    eprintln!(
        "SASL_SSL broker at {} after {:.1}s",
        broker.address,
        started.elapsed().as_secs_f64()
    );

    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("KAFKA_BROKERS".into(), broker.address.clone()));

    // Daemons that must never get in: TLS but no SASL, and a wrong password. They start
    // first and keep trying while the real pipeline works.
    let wrong = format!("{}-wrong", certs.password);
    let outsiders = [
        (
            "no-sasl",
            kafka_toml(&[("security.protocol", "SSL"), ("ssl.ca.location", &certs.ca)]),
        ),
        (
            "wrong-password",
            kafka_toml(&sasl_ssl_properties(&certs, &wrong)),
        ),
    ];
    let mut refused_daemons = Vec::new();
    for (name, toml) in &outsiders {
        let service_name = format!("{}-{name}", pipeline.prefix);
        let group = format!("{}.{name}", pipeline.prefix);
        let env = pipeline.env_for(
            "payment",
            &[
                ("SERVICE_NAME", &service_name),
                ("PAYMENT_GROUP_ID", &group),
            ],
        );
        let path = pipeline.log_dir.join(format!("payment-{name}.toml"));
        std::fs::write(&path, toml).expect("config");
        let daemon = Daemon::spawn_with_config("payment", &env, &pipeline.log_dir, &path);
        refused_daemons.push((*name, daemon, Instant::now()));
    }

    // The pipeline, every daemon configured through [kafka] only.
    let toml = kafka_toml(&sasl_ssl_properties(&certs, &certs.password));
    for service in SERVICES {
        pipeline.start_with_config(service, &[], &toml).await;
    }
    let accepted = post_many(pipeline.order_port, "secure", ORDERS, 16).await;
    assert_eq!(accepted.len(), ORDERS, "orders refused over SASL_SSL");

    let reader = client_config(
        &broker.address,
        &sasl_ssl_properties(&certs, &certs.password),
    );
    let reserved = pipeline.reserved.clone();
    let records = tokio::task::spawn_blocking(move || {
        consume_with(
            reader,
            &reserved,
            ORDERS,
            Duration::from_secs(90),
            Duration::from_secs(2),
        )
    })
    .await
    .expect("reader");
    let counts = count_by_order(&records);
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "not reserved: {missing:?}");
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "reserved more than once: {repeated:?}");
    assert_eq!(records.len(), ORDERS, "nothing but the accepted orders");
    eprintln!(
        "{ORDERS} orders accepted and reserved exactly once over SASL_SSL after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The outsiders never became ready, and said they could not reach Kafka.
    for (name, daemon, spawned) in &mut refused_daemons {
        let minimum = *spawned + Duration::from_secs(15);
        if Instant::now() < minimum {
            tokio::time::sleep_until(minimum.into()).await;
        }
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "{name}: the daemon exited:\n{}",
            daemon.log_text()
        );
        let (status, _) = http_get(daemon.metrics_port, "/readyz")
            .await
            .expect("readyz");
        let log = daemon.log_text();
        assert_eq!(status, 503, "{name}: ready without credentials:\n{log}");
        assert!(
            log.contains("Kafka is not available") && !log.contains("kop::daemon: ready"),
            "{name}: expected only 'Kafka is not available':\n{log}"
        );
        // And why: librdkafka's reason, not only "broker transport failure".
        let expected_reason = match *name {
            "wrong-password" => "SASL authentication error",
            _ => "Disconnected",
        };
        let reason = log
            .lines()
            .find(|l| l.contains("Kafka refused or dropped the connection"))
            .unwrap_or_default();
        assert!(
            reason.contains(expected_reason),
            "{name}: the log does not say {expected_reason:?}:\n{log}"
        );
        eprintln!("daemon with {name}, never ready: {reason}");
    }
    // The broker logged the wrong password as a failed SCRAM authentication.
    let broker_log = std::fs::read_to_string(broker.state.join("broker.log")).unwrap_or_default();
    assert!(
        broker_log.contains("Failed authentication")
            && broker_log.contains("invalid credentials with SASL mechanism SCRAM-SHA-512"),
        "no failed SCRAM authentication in the broker log"
    );

    // Plain rdkafka clients: a wrong password is reported as an authentication failure;
    // without SASL (TLS only) or without TLS the broker drops the connection.
    let address = broker.address.clone();
    let ca = certs.ca.clone();
    let wrong_password = wrong.clone();
    let reports = tokio::task::spawn_blocking(move || {
        let certs_props = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", USER),
            ("sasl.password", wrong_password.as_str()),
            ("ssl.ca.location", ca.as_str()),
        ];
        let wrong = refused(
            "wrong password",
            client_config(&address, &certs_props),
            &["Authentication failed", "invalid credentials"],
        );
        let no_sasl = refused(
            "TLS without SASL",
            client_config(
                &address,
                &[
                    ("security.protocol", "SSL"),
                    ("ssl.ca.location", ca.as_str()),
                ],
            ),
            &["Disconnected"],
        );
        let plaintext = refused(
            "plaintext",
            client_config(&address, &[]),
            &["Disconnected", "APIVERSION_QUERY"],
        );
        (wrong, no_sasl, plaintext)
    })
    .await
    .expect("clients");
    eprintln!("wrong password: {}", reports.0);
    eprintln!("TLS without SASL: {}", reports.1);
    eprintln!("plaintext: {}", reports.2);

    drop(refused_daemons);
    pipeline.daemons.clear();
    eprintln!("done after {:.1}s", started.elapsed().as_secs_f64());
}
