//! The part store (being written).
