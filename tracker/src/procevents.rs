//! Decodes the messages of the kernel's process events connector
//! (`sys::ProcConnector`): which process forked, exec'd or exited.
//!
//! Layout (linux/netlink.h, linux/connector.h, linux/cn_proc.h): each datagram holds
//! netlink messages (`struct nlmsghdr`, 16 bytes), each carrying a `struct cn_msg` (20
//! bytes) whose data is a `struct proc_event`: `what` (u32), `cpu` (u32),
//! `timestamp_ns` (u64, CLOCK_MONOTONIC), then the event's fields.

use crate::sys::{CN_MSG_LEN, NLMSG_HDR_LEN};

const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// Where a `proc_event`'s fields start.
const EVENT_DATA: usize = 16;

/// One process event. Pids are thread group ids (what /proc and fanotify name);
/// events of other threads than a group's leader are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    Fork { parent: u32, child: u32 },
    Exec { pid: u32 },
    Exit { pid: u32 },
}

/// An event and when it happened (CLOCK_MONOTONIC, ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timed {
    pub event: ProcEvent,
    pub timestamp_ns: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The events in one datagram; what cannot be decoded is skipped.
pub fn parse(datagram: &[u8]) -> Vec<Timed> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(len) = u32_at(datagram, at) {
        let len = len as usize;
        if len < NLMSG_HDR_LEN || at + len > datagram.len() {
            break;
        }
        let msg = &datagram[at..at + len];
        if let Some(ev) = msg.get(NLMSG_HDR_LEN + CN_MSG_LEN..).and_then(event) {
            out.push(ev);
        }
        // Netlink messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    out
}

fn event(data: &[u8]) -> Option<Timed> {
    let what = u32_at(data, 0)?;
    let timestamp_ns = u64_at(data, 8)?;
    let f = |i: usize| u32_at(data, EVENT_DATA + 4 * i);
    let event = match what {
        PROC_EVENT_FORK => {
            // parent_pid, parent_tgid, child_pid, child_tgid
            let (child_pid, child_tgid) = (f(2)?, f(3)?);
            if child_pid != child_tgid {
                return None;
            }
            ProcEvent::Fork {
                parent: f(1)?,
                child: child_tgid,
            }
        }
        PROC_EVENT_EXEC => ProcEvent::Exec { pid: f(1)? },
        PROC_EVENT_EXIT => {
            let (pid, tgid) = (f(0)?, f(1)?);
            if pid != tgid {
                return None;
            }
            ProcEvent::Exit { pid: tgid }
        }
        _ => return None,
    };
    Some(Timed {
        event,
        timestamp_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram of one netlink message carrying a proc_event.
    fn message(what: u32, ts: u64, fields: &[u32]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&what.to_ne_bytes());
        data.extend_from_slice(&0u32.to_ne_bytes());
        data.extend_from_slice(&ts.to_ne_bytes());
        for f in fields {
            data.extend_from_slice(&f.to_ne_bytes());
        }
        let len = NLMSG_HDR_LEN + CN_MSG_LEN + data.len();
        let mut m = vec![0u8; NLMSG_HDR_LEN + CN_MSG_LEN];
        m[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&data);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        m
    }

    #[test]
    fn decodes_fork_exec_exit_and_skips_threads() {
        let cases: Vec<(Vec<u8>, Vec<Timed>)> = vec![
            (
                message(PROC_EVENT_FORK, 5, &[10, 10, 11, 11]),
                vec![Timed {
                    event: ProcEvent::Fork {
                        parent: 10,
                        child: 11,
                    },
                    timestamp_ns: 5,
                }],
            ),
            // A new thread of 10: not a process.
            (message(PROC_EVENT_FORK, 5, &[10, 10, 12, 10]), vec![]),
            (
                message(PROC_EVENT_EXEC, 7, &[11, 11]),
                vec![Timed {
                    event: ProcEvent::Exec { pid: 11 },
                    timestamp_ns: 7,
                }],
            ),
            (
                message(PROC_EVENT_EXIT, 9, &[11, 11, 0, 17, 10, 10]),
                vec![Timed {
                    event: ProcEvent::Exit { pid: 11 },
                    timestamp_ns: 9,
                }],
            ),
            (
                message(PROC_EVENT_EXIT, 9, &[12, 10, 0, 17, 10, 10]),
                vec![],
            ),
            // Other kinds (uid change) and truncated messages.
            (message(4, 9, &[11, 11, 0, 0]), vec![]),
            (
                message(PROC_EVENT_EXEC, 7, &[11, 11])[..30].to_vec(),
                vec![],
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&bytes), want, "{bytes:?}");
        }
        // Two messages in one datagram.
        let mut two = message(PROC_EVENT_EXEC, 1, &[3, 3]);
        two.extend(message(PROC_EVENT_EXEC, 2, &[4, 4]));
        assert_eq!(parse(&two).len(), 2);
    }
}
