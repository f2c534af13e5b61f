//! The destination engine given good and bad streams: it resumes its
//! guest only after a complete, verified stream, and refuses everything
//! else with the right error, without resuming.

use migrate_core::digest::{completion_digest, digest_memory};
use migrate_core::driver::run_destination;
use migrate_core::protocol::{
    encode_page_batch, encode_to_vec, Capabilities, Decoder, ProtocolError, Record, RecordType,
    RECORD_HEADER_LEN, VERSION,
};
use migrate_core::transport::{channel_pair, Transport, TransportError};
use migrate_core::VirtualClock;
use migrate_core::{DestStatus, DestinationEngine};
use migrate_core::{ErrorKind, MigrationError};
use migrate_core::{MemoryLayout, PageNum, PageSize, Region};
use std::sync::Arc;
use std::time::Duration;

mod common;
#[allow(unused_imports)]
use common::*;
mod bad_records;
mod driver;
mod good_stream;
mod incomplete_streams;
mod integrity;
mod populated;
mod post_copy;
