#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rtable_fuzz_targets::documents::replica_status(data));
