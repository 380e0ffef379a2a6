//! Worker steering: the `SK_REUSEPORT` program on the workers' UDP sockets (see
//! `tunnelmesh_common::steer`). Attached to the reuseport group once; it lives as long as the
//! sockets do (closing them all destroys the group and the program's hold on it).

use std::{net::UdpSocket, os::fd::AsFd};

use aya::{Ebpf, maps::ReusePortSockArray, programs::SkReuseport};
use tunnelmesh_common::steer::{MAX_WORKERS, STEER_PROGRAM, WORKER_SOCKETS_MAP};

use super::{EBPF_OBJECT, FastpathError, STEER_MAPS, loader};

/// The steering program, attached to one reuseport group of worker sockets.
pub struct Steering {
    _ebpf: Ebpf,
}

impl Steering {
    /// Put `sockets` (worker `i`'s at index `i`, all of one `SO_REUSEPORT` group) in the socket
    /// array and attach the program to the group.
    pub fn attach(sockets: &[UdpSocket]) -> Result<Steering, FastpathError> {
        let program_error = |source| FastpathError::Program {
            program: "SK_REUSEPORT steering",
            interface: "(the worker sockets)".into(),
            source,
        };
        if sockets.is_empty() || sockets.len() > MAX_WORKERS as usize {
            return Err(FastpathError::Workers(sockets.len()));
        }
        let mut ebpf = loader(&STEER_MAPS).load(EBPF_OBJECT)?;
        {
            let mut array = ReusePortSockArray::try_from(
                ebpf.map_mut(WORKER_SOCKETS_MAP)
                    .expect("the embedded object has the worker socket array"),
            )?;
            for (i, socket) in sockets.iter().enumerate() {
                array.set(i as u32, socket, 0)?;
            }
        }
        let program: &mut SkReuseport = ebpf
            .program_mut(STEER_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("the embedded object has the steering program");
        program.load().map_err(program_error)?;
        program.attach(sockets[0].as_fd()).map_err(program_error)?;
        Ok(Steering { _ebpf: ebpf })
    }
}
