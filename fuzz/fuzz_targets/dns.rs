#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_node::fuzz::dns_query(data));
