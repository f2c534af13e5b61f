//! The destination engine fed a whole stream, broken as a network breaks
//! it: it never resumes a guest unlike the source's.
#![no_main]

use backend_sim::fuzzing::{self, StreamInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: StreamInput| fuzzing::destination(&input));
