//! The rtable sidecar: one replica of a replicated table.
