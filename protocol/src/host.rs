//! A replica's `host` node: where peers fetch its parts (ClickHouse's ReplicatedMergeTreeAddress).

use crate::codec::{CodecError, Lines};

const WHAT: &str = "host";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub host: String,
    /// The interserver (part exchange) port.
    pub port: u16,
    pub tcp_port: u16,
    pub database: String,
    pub table: String,
    pub scheme: String,
}

impl HostInfo {
    pub fn render(&self) -> String {
        format!(
            "host: {}\nport: {}\ntcp_port: {}\ndatabase: {}\ntable: {}\nscheme: {}\n",
            self.host, self.port, self.tcp_port, self.database, self.table, self.scheme
        )
    }

    pub fn parse(text: &str) -> Result<HostInfo, CodecError> {
        let mut lines = Lines::new(WHAT, text);
        let host = lines.field("host: ")?.to_string();
        let port = lines.number("port: ")?;
        let tcp_port = lines.number("tcp_port: ")?;
        let database = lines.field("database: ")?.to_string();
        let table = lines.field("table: ")?.to_string();
        // Old ClickHouse versions stop before `scheme`.
        let scheme = match lines.peek() {
            Some(l) if l.starts_with("scheme: ") => lines.field("scheme: ")?.to_string(),
            _ => "http".to_string(),
        };
        if host.is_empty() {
            return Err(CodecError::new(WHAT, 1, "empty host"));
        }
        Ok(HostInfo {
            host,
            port,
            tcp_port,
            database,
            table,
            scheme,
        })
    }

    /// `host:port` of the part exchange.
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_clickhouse_layout() {
        let h = HostInfo {
            host: "events-0.events.default.svc.cluster.local".into(),
            port: 9009,
            tcp_port: 9000,
            database: "default".into(),
            table: "events".into(),
            scheme: "http".into(),
        };
        let text = h.render();
        assert_eq!(
            text,
            "host: events-0.events.default.svc.cluster.local\nport: 9009\ntcp_port: 9000\ndatabase: default\ntable: events\nscheme: http\n"
        );
        assert_eq!(HostInfo::parse(&text).expect("parses"), h);
        assert_eq!(
            h.address(),
            "events-0.events.default.svc.cluster.local:9009"
        );
    }

    #[test]
    fn rejects_malformed() {
        assert!(HostInfo::parse("").is_err());
        assert!(HostInfo::parse("host: a\nport: x\n").is_err());
        assert!(HostInfo::parse("host: a\nport: 1\n").is_err());
        let old = HostInfo::parse("host: a\nport: 1\ntcp_port: 2\ndatabase: d\ntable: t\n")
            .expect("old layout");
        assert_eq!(old.scheme, "http");
    }
}
