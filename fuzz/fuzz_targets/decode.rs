//! The decoder given any frames: it never panics.
#![no_main]

use backend_sim::fuzzing::{self, DecodeInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: DecodeInput| fuzzing::decode(&input));
