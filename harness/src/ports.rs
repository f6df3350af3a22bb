//! The ports of the nodes: which are asked for, picking free ones, and the record a
//! cluster keeps of them (its nodes name each other's controllers, and clients know the
//! bootstrap list, so they never change until "reset").

use std::fs;
use std::path::Path;

use crate::layout::Mode;
use crate::process::{pick_free_port, port_open};
use crate::{Result, at, fail};

/// The ports asked for; 0: pick a free one.
#[derive(Clone, Copy)]
pub(crate) struct Wanted {
    pub port: u16,
    /// Asked for explicitly, rather than the default: a running broker elsewhere is worth
    /// a warning.
    pub explicit: bool,
    pub controller: u16,
    pub internal: u16,
}

/// The ports of one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ports {
    /// The PLAINTEXT listener: the client port, or the inter-broker one with --sasl-ssl.
    pub plain: u16,
    pub controller: u16,
    /// The SASL_SSL client listener, with --sasl-ssl only.
    pub secure: Option<u16>,
}

impl Ports {
    /// The port clients use.
    pub fn client(&self) -> u16 {
        self.secure.unwrap_or(self.plain)
    }

    pub fn all(&self) -> impl Iterator<Item = u16> {
        [Some(self.plain), Some(self.controller), self.secure]
            .into_iter()
            .flatten()
    }

    pub fn load(file: &Path) -> Result<Option<Ports>> {
        let Ok(text) = fs::read_to_string(file) else {
            return Ok(None);
        };
        let mut ports = Ports::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let Ok(port) = value.parse() else {
                return fail(format!("{}: bad '{line}'", file.display()));
            };
            match key {
                "plain" => ports.plain = port,
                "controller" => ports.controller = port,
                "secure" => ports.secure = Some(port),
                _ => {}
            }
        }
        Ok(Some(ports))
    }

    pub fn save(&self, file: &Path) -> Result<()> {
        let mut text = format!("plain={}\ncontroller={}\n", self.plain, self.controller);
        if let Some(secure) = self.secure {
            text += &format!("secure={secure}\n");
        }
        fs::write(file, text).map_err(at(file))
    }
}

/// Comma-separated client (or, with `plaintext`, PLAINTEXT) addresses of all nodes.
pub(crate) fn bootstrap_list(ports: &[Ports], plaintext: bool) -> String {
    ports
        .iter()
        .map(|p| {
            let port = if plaintext { p.plain } else { p.client() };
            format!("127.0.0.1:{port}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Replaces the zero ports by free ones that differ from `others` and each other; true if
/// any was picked.
pub(crate) fn fill_free_ports(ports: &mut Ports, others: &[u16]) -> Result<bool> {
    let mut taken: Vec<u16> = others.iter().copied().chain(ports.all()).collect();
    let mut picked = false;
    for port in [&mut ports.plain, &mut ports.controller]
        .into_iter()
        .chain(ports.secure.as_mut())
    {
        if *port == 0 {
            *port = pick_free_port(&taken)?;
            taken.push(*port);
            picked = true;
        }
    }
    Ok(picked)
}

/// The ports of every node: from the given bases (node i: base+i-1) or free ones.
pub(crate) fn pick_cluster_ports(mode: &Mode, wanted: Wanted) -> Result<Vec<Ports>> {
    let mut ports = Vec::new();
    for i in 1..=mode.nodes {
        let base = |port: u16| -> Result<u16> {
            if port == 0 {
                return Ok(0);
            }
            u16::try_from(u32::from(port) + i - 1).or_else(|_| {
                fail(format!(
                    "port out of range for node {i} (base ports too high)"
                ))
            })
        };
        ports.push(match mode.sasl_ssl {
            Some(_) => Ports {
                plain: base(wanted.internal)?,
                controller: base(wanted.controller)?,
                secure: Some(base(wanted.port)?),
            },
            None => Ports {
                plain: base(wanted.port)?,
                controller: base(wanted.controller)?,
                secure: None,
            },
        });
    }
    for i in 0..ports.len() {
        let others: Vec<u16> = ports.iter().flat_map(Ports::all).collect();
        fill_free_ports(&mut ports[i], &others)?;
    }
    Ok(ports)
}

/// Fails clearly when a port is taken, instead of via a bind error deep in the broker log.
pub(crate) fn check_ports(ports: &Ports) -> Result<()> {
    let mut seen = Vec::new();
    for port in ports.all() {
        if seen.contains(&port) {
            return fail(format!("port {port} is given twice"));
        }
        seen.push(port);
        if port_open(port) {
            return fail(format!(
                "port {port} is already in use (another broker? try --port 0)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn wanted(port: u16, controller: u16) -> Wanted {
        Wanted {
            port,
            explicit: true,
            controller,
            internal: 0,
        }
    }

    #[test]
    fn cluster_ports_count_up_from_the_bases_and_free_ones_differ() {
        let mode = Mode {
            nodes: 3,
            sasl_ssl: None,
        };
        let ports = pick_cluster_ports(&mode, wanted(9092, 0)).unwrap();
        let clients: Vec<u16> = ports.iter().map(Ports::client).collect();
        assert_eq!(clients, [9092, 9093, 9094]);
        let mut all: Vec<u16> = ports.iter().flat_map(Ports::all).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6, "{ports:?}");
        assert_eq!(
            bootstrap_list(&ports, false),
            "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"
        );
        let err = pick_cluster_ports(&mode, wanted(65535, 0)).unwrap_err();
        assert!(err.to_string().contains("node 2"), "{err}");
    }

    #[test]
    fn with_sasl_ssl_the_clients_use_the_secure_port() {
        let mode = Mode {
            nodes: 1,
            sasl_ssl: Some(PathBuf::from("/certs")),
        };
        let ports = pick_cluster_ports(&mode, wanted(9093, 0)).unwrap();
        assert_eq!(ports[0].client(), 9093);
        assert_ne!(ports[0].plain, 9093);
        assert_eq!(
            bootstrap_list(&ports, true),
            format!("127.0.0.1:{}", ports[0].plain)
        );
    }

    #[test]
    fn the_ports_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("kop-harness-ports-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ports");
        let ports = Ports {
            plain: 1,
            controller: 2,
            secure: Some(3),
        };
        ports.save(&file).unwrap();
        assert_eq!(Ports::load(&file).unwrap(), Some(ports));
        assert_eq!(Ports::load(&dir.join("none")).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
