//! spright-core wire messages: control-protocol packets (JSON over SOCK_SEQPACKET, as a
//! function or the pool owner receives them, including the routing table a Welcome
//! carries), and the autoscaler's protobuf Stat / WireStatMessages.
//! First byte: 0 control packet, 1 Stat, 2 WireStatMessages.
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, send, socketpair};
use prost::Message;
use spright_core::autoscaler::{Stat, WireStatMessages};
use spright_core::control::{ControlConn, FunctionMessage, OwnerMessage};

fn pair() -> (OwnedFd, ControlConn) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (a, ControlConn::from_fd(b))
}

fn control(packet: &[u8]) {
    if packet.is_empty() {
        return;
    }
    use std::os::fd::AsRawFd;
    let (tx, rx) = pair();
    if send(tx.as_raw_fd(), packet, MsgFlags::MSG_NOSIGNAL).is_err() {
        return;
    }
    let _ = send(tx.as_raw_fd(), packet, MsgFlags::MSG_NOSIGNAL);
    if let Ok((msg, _fd)) = rx.recv::<FunctionMessage>() {
        let _ = format!("{msg:?}");
    }
    if let Ok((OwnerMessage::Welcome(w), _fd)) = rx.recv::<OwnerMessage>() {
        let table = &w.routing;
        for c in 0..table.chains.len().min(64) {
            for hop in 0..8 {
                let _ = table.next(c as u16, hop);
            }
        }
        for id in table.functions.values().take(64) {
            let _ = table.name(*id);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => control(rest),
        1 => {
            if let Ok(s) = Stat::decode(rest) {
                let again = Stat::decode(s.encode_to_vec().as_slice()).expect("re-decode");
                assert_eq!(again.encode_to_vec(), s.encode_to_vec());
            }
        }
        _ => {
            if let Ok(m) = WireStatMessages::decode(rest) {
                let again =
                    WireStatMessages::decode(m.encode_to_vec().as_slice()).expect("re-decode");
                assert_eq!(again.encode_to_vec(), m.encode_to_vec());
            }
        }
    }
});
