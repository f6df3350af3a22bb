//! Collecting the Kafka jars with Maven into the cache, once, and running Java tools from
//! them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Kafka, Result, at, fail, say};

/// The version in the pom's `<kafka.version>`.
pub(crate) fn kafka_version(pom: &Path) -> Result<String> {
    let text = fs::read_to_string(pom).map_err(at(pom))?;
    let version = text
        .split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
        .map(|(version, _)| version.trim().to_string())
        .filter(|v| !v.is_empty());
    version.ok_or_else(|| Error::Failed(format!("no <kafka.version> in {}", pom.display())))
}

/// The SHA-256 of a file, as `sha256sum` prints it (the cache's marker predates this crate
/// and holds the pom's checksum in that form).
pub(crate) fn sha256(file: &Path) -> Result<String> {
    let output = Command::new("sha256sum")
        .arg(file)
        .output()
        .map_err(|source| Error::Run {
            command: format!("sha256sum {}", file.display()),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.split_whitespace().next() {
        Some(sum) if output.status.success() => Ok(sum.to_string()),
        _ => fail(format!(
            "sha256sum {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

impl Kafka {
    pub(crate) fn lib_dir(&self) -> PathBuf {
        self.cache.join("libs")
    }

    pub(crate) fn pom(&self) -> PathBuf {
        self.files.join("pom.xml")
    }

    pub(crate) fn log4j_config(&self) -> PathBuf {
        self.files.join("log4j2.properties")
    }

    /// Written only after Maven succeeded, so an interrupted fetch is redone. It holds the
    /// pom's checksum, so editing the pom (e.g. a new version while KOP_KAFKA_CACHE is
    /// pinned) also triggers a new fetch.
    fn fetch_marker(&self) -> PathBuf {
        self.cache.join("fetch-complete")
    }

    fn fetch_is_complete(&self) -> Result<bool> {
        let marker = fs::read_to_string(self.fetch_marker()).unwrap_or_default();
        Ok(marker.trim() == sha256(&self.pom())?)
    }

    /// Collects the broker jars with Maven into the cache, unless already there. `quiet`
    /// (as `start` uses it) says nothing when there is nothing to do.
    pub fn fetch(&self, quiet: bool) -> Result<()> {
        require_java(&self.version)?;
        let lib = self.lib_dir();
        if self.fetch_is_complete()? {
            if !quiet {
                say(format!(
                    "Kafka {} jars already in {}",
                    self.version,
                    lib.display()
                ));
            }
            return Ok(());
        }
        if which("mvn").is_none() {
            return fail(
                "mvn not found. Maven is needed once to download the Kafka jars \
                 (Debian: apt-get install maven).",
            );
        }
        fs::create_dir_all(&self.cache).map_err(at(&self.cache))?;
        // The lock keeps two concurrent fetches (say a dev broker and a test run starting
        // together) from deleting each other's half-downloaded jars. The file is opened
        // close-on-exec, so no broker inherits the lock.
        let lock_path = self.cache.join(".lock");
        let lock = fs::File::create(&lock_path).map_err(at(&lock_path))?;
        lock.lock().map_err(at(&lock_path))?;
        if self.fetch_is_complete()? {
            return Ok(()); // somebody else finished while we waited for the lock
        }
        let marker = self.fetch_marker();
        let _ = fs::remove_dir_all(&lib);
        let _ = fs::remove_file(&marker);
        say(format!(
            "fetching Kafka {} jars with Maven into {} (only needed once) ...",
            self.version,
            lib.display()
        ));
        // Maven's chatter goes to a file (`start` keeps stdout for the address) and is
        // shown only when something went wrong.
        let maven_log = self.cache.join("maven.log");
        let log = fs::File::create(&maven_log).map_err(at(&maven_log))?;
        let log2 = log.try_clone().map_err(at(&maven_log))?;
        let status = Command::new("mvn")
            .arg("-B")
            .arg("-f")
            .arg(self.pom())
            .arg("dependency:copy-dependencies")
            .arg("-DincludeScope=runtime")
            .arg(format!("-DoutputDirectory={}", lib.display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(|source| Error::Run {
                command: "mvn".into(),
                source,
            })?;
        if !status.success() {
            let text = fs::read_to_string(&maven_log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("[INFO] Download"))
                .collect();
            eprintln!("{}", lines[lines.len().saturating_sub(30)..].join("\n"));
            return fail(format!(
                "Maven could not collect the Kafka jars (full output in {}; is Maven Central \
                 reachable?)",
                maven_log.display()
            ));
        }
        let broker_jar = lib.join(format!("kafka_2.13-{}.jar", self.version));
        if !broker_jar.is_file() {
            return fail(format!(
                "Maven finished, but {} is missing",
                broker_jar.display()
            ));
        }
        fs::write(&marker, format!("{}\n", sha256(&self.pom())?)).map_err(at(&marker))?;
        let jars = fs::read_dir(&lib)
            .map_err(at(&lib))?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "jar"))
            .count();
        say(format!("fetched {jars} jars"));
        Ok(())
    }

    /// A Java main class from the Kafka jars, with our logging configuration.
    pub(crate) fn java_tool(&self, main_class: &str) -> Command {
        let mut command = Command::new("java");
        command
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j_config().display()
            ))
            .arg("-cp")
            .arg(self.classpath())
            .arg(main_class)
            .stdin(Stdio::null());
        command
    }

    /// Every jar of the cache: Java expands the trailing `*` itself.
    pub(crate) fn classpath(&self) -> String {
        format!("{}/*", self.lib_dir().display())
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn require_java(kafka_version: &str) -> Result<()> {
    if which("java").is_none() {
        return fail(format!(
            "java not found. Kafka {kafka_version} needs Java 17 or newer \
             (Debian: apt-get install default-jre-headless)."
        ));
    }
    let output = Command::new("java")
        .arg("-version")
        .output()
        .map_err(|source| Error::Run {
            command: "java -version".into(),
            source,
        })?;
    // `java -version` writes e.g. `openjdk version "17.0.13" 2024-10-15` to stderr.
    let text = String::from_utf8_lossy(&output.stderr);
    let version = text
        .split_once("version \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v.to_string())
        .unwrap_or_default();
    let major: Option<u32> = version.split('.').next().and_then(|m| m.parse().ok());
    if major.is_some_and(|m| m < 17) {
        return fail(format!(
            "java {version} found, but Kafka {kafka_version} needs Java 17 or newer."
        ));
    }
    Ok(())
}
