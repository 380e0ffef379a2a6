//! The slow path driven with a virtual clock (the machines are [`super::testbed`]'s).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{Input, Output};
use crate::{
    device::{CoordinatorRequest, Event, Via},
    protocol::{
        discovery::NatKind,
        noise::CookieJar,
        probe, punch,
        session::REKEY_TIMEOUT,
        wire::{self, Kind},
    },
};

use super::testbed::*;
use super::{TICK, UNDER_LOAD_QUEUE, accept::MIN_INITIATION_INTERVAL, ping::PING_TIMEOUT};

mod handshakes;
mod paths_and_discovery;
