//! Whether a broker serves clients yet, asked in Kafka's own protocol: one Metadata
//! request, so that no client tool (nor a JVM per attempt) is needed.
//!
//! A broker is listed in a Metadata response only after it registered with the controller
//! and was unfenced, i.e. when topics can be created and used. An open port alone is not
//! enough: the listener accepts connections a little earlier.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Metadata v4: the oldest version Kafka 4 still answers (KIP-896 removed 0-3), and the
/// newest before the "flexible" encoding, so the fields are plain fixed-size ones.
const METADATA: i16 = 3;
const VERSION: i16 = 4;

/// True once the broker on 127.0.0.1:`port` lists node `id` among the live brokers.
pub(crate) fn lists_node(port: u16, id: u32) -> bool {
    live_nodes(port).is_ok_and(|nodes| nodes.contains(&(id as i32)))
}

fn live_nodes(port: u16) -> io::Result<Vec<i32>> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&metadata_request())?;

    let mut size = [0; 4];
    stream.read_exact(&mut size)?;
    let size = i32::from_be_bytes(size);
    if !(8..=1 << 24).contains(&size) {
        return Err(invalid("implausible response size"));
    }
    let mut body = vec![0; size as usize];
    stream.read_exact(&mut body)?;
    parse_brokers(&body)
}

fn metadata_request() -> Vec<u8> {
    let client_id = b"kop-harness";
    let mut message = Vec::new();
    // Request header v1: api key, version, correlation id, client id.
    message.extend(METADATA.to_be_bytes());
    message.extend(VERSION.to_be_bytes());
    message.extend(1i32.to_be_bytes());
    message.extend((client_id.len() as i16).to_be_bytes());
    message.extend(client_id);
    // Topics: an empty array asks for none (null would mean all), then
    // allow_auto_topic_creation = false.
    message.extend(0i32.to_be_bytes());
    message.push(0);
    let mut request = (message.len() as i32).to_be_bytes().to_vec();
    request.extend(message);
    request
}

/// The node ids of the brokers array of a Metadata v4 response (after the size).
fn parse_brokers(body: &[u8]) -> io::Result<Vec<i32>> {
    let mut reader = Reader(body);
    let _correlation_id = reader.i32()?;
    let _throttle_time_ms = reader.i32()?;
    let count = reader.i32()?;
    let mut ids = Vec::new();
    for _ in 0..count.max(0) {
        ids.push(reader.i32()?);
        reader.string()?; // host
        reader.i32()?; // port
        reader.string()?; // rack, nullable
    }
    Ok(ids)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(invalid("truncated metadata response"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i32(&mut self) -> io::Result<i32> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A (nullable) string: an i16 length, -1 for null.
    fn string(&mut self) -> io::Result<()> {
        let bytes = self.take(2)?;
        let len = i16::from_be_bytes([bytes[0], bytes[1]]);
        self.take(len.max(0) as usize)?;
        Ok(())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_of_a_response_are_read() {
        let mut body = Vec::new();
        body.extend(1i32.to_be_bytes());
        body.extend(0i32.to_be_bytes());
        body.extend(2i32.to_be_bytes());
        for (id, rack) in [(1i32, None), (3, Some("r1"))] {
            body.extend(id.to_be_bytes());
            body.extend(9i16.to_be_bytes());
            body.extend(b"127.0.0.1");
            body.extend(9092i32.to_be_bytes());
            match rack {
                None => body.extend((-1i16).to_be_bytes()),
                Some(r) => {
                    body.extend((r.len() as i16).to_be_bytes());
                    body.extend(r.as_bytes());
                }
            }
        }
        body.extend([0; 8]); // cluster id, controller id, ...: not read
        assert_eq!(parse_brokers(&body).unwrap(), vec![1, 3]);
        assert!(parse_brokers(&body[..20]).is_err());
    }

    #[test]
    fn the_request_is_sized_and_asks_for_no_topics() {
        let request = metadata_request();
        let size = i32::from_be_bytes(request[..4].try_into().unwrap());
        assert_eq!(size as usize, request.len() - 4);
        assert_eq!(&request[4..8], &[0, 3, 0, 4]);
        assert_eq!(&request[request.len() - 5..], &[0, 0, 0, 0, 0]);
    }
}
