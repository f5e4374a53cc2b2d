#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rtable_fuzz_targets::inserts::insert_json(data));
