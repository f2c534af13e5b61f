//! The source engine fed broken replies: it never leaves its guest down
//! before the point of no return, nor completes unconfirmed.
#![no_main]

use backend_sim::fuzzing::{self, StreamInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: StreamInput| fuzzing::source(&input));
