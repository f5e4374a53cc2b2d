#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rtable_fuzz_targets::tree_nodes::quorum_last_part(data));
