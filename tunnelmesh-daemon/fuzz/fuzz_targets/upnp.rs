#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnelmesh_daemon::fuzzing::upnp(data));
