#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rtable_fuzz_targets::exchange::exchange_header(data));
