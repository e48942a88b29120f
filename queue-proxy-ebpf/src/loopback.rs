//! Full mode in standalone: this sidecar short-circuits its own hop to the user container.
//!
//! In full mode the proxy runs as in userspace mode, but the loopback connections between
//! this sidecar and `127.0.0.1:USER_PORT` go through a sockmap: the kernel moves each write
//! straight into the peer socket's receive queue ([`spright_ebpf::loopback`]). Who attaches
//! the programs:
//! - with `SPRIGHT_ACCOUNTING=standalone` (root, CAP_BPF + CAP_NET_ADMIN), this process, on the
//!   same cgroup as its accounting programs (`SPRIGHT_ACCOUNTING_CGROUP`, default its own
//!   cgroup). The cgroup must hold the user container too: both ends of the hop are filed
//!   only if both sockets belong to it (a pod cgroup, or one cgroup both processes run in);
//! - with `SPRIGHT_ACCOUNTING=agent`, spright-node-agent, for the pods it knows in full mode;
//! - with userspace accounting, nobody: the hop stays on TCP, and the log says so.
//!
//! The kernel accounting then counts the serving port: the user port's bytes no longer pass
//! through the TCP stack, where its `cgroup_skb` programs would see them.
//!
//! The programs are detached when the returned value is dropped (after the drain), and the
//! counters are logged then.

use std::path::Path;

use spright_ebpf::loopback::Loopback;

use crate::ebpf_accounting::Mode as AccountingMode;
use crate::mode::DataplaneMode;

/// The port the kernel accounting counts: the serving port in full mode (the user port's
/// hop bypasses the TCP stack there), the user port otherwise.
pub fn accounting_port(mode: DataplaneMode, serving_port: u16, user_port: u16) -> u16 {
    match mode {
        DataplaneMode::Full => serving_port,
        DataplaneMode::Userspace | DataplaneMode::EventDriven => user_port,
    }
}

/// The attached redirect; detaches (and logs its counters) on drop.
#[derive(Debug)]
pub struct FullMode {
    loopback: Loopback,
}

impl Drop for FullMode {
    fn drop(&mut self) {
        match self.loopback.counters() {
            Ok(c) => tracing::info!(
                redirected_messages = c.redirected_messages,
                redirected_bytes = c.redirected_bytes,
                passed_messages = c.passed_messages,
                passed_bytes = c.passed_bytes,
                sockets_filed = c.sockets_filed,
                "full mode: detaching the loopback redirect"
            ),
            Err(error) => tracing::warn!(%error, "full mode: cannot read the loopback counters"),
        }
    }
}

/// In full mode with standalone accounting, attaches the loopback redirect for `user_port`
/// to the accounting's cgroup. Says in the log what it did; a failure leaves the hop on TCP.
pub fn attach(
    mode: DataplaneMode,
    accounting: &AccountingMode,
    user_port: u16,
) -> Option<FullMode> {
    if mode != DataplaneMode::Full {
        return None;
    }
    let cgroup = match accounting {
        AccountingMode::Standalone(Some(path)) => path.clone(),
        AccountingMode::Standalone(None) => match crate::ebpf_accounting::own_cgroup() {
            Ok(path) => path,
            Err(error) => {
                tracing::warn!(%error, "full mode: cannot find this process's cgroup; the hop to the user container stays on TCP");
                return None;
            }
        },
        AccountingMode::Agent(addr) => {
            tracing::info!(agent = %addr, "full mode: the node agent attaches the loopback redirect");
            return None;
        }
        AccountingMode::Userspace => {
            tracing::warn!(
                "full mode needs SPRIGHT_ACCOUNTING=standalone (root) or agent; the hop to the user container stays on TCP"
            );
            return None;
        }
    };
    attach_to(&cgroup, user_port)
}

fn attach_to(cgroup: &Path, user_port: u16) -> Option<FullMode> {
    match Loopback::attach(cgroup, &[user_port]) {
        Ok(loopback) => {
            tracing::info!(cgroup = %cgroup.display(), user_port, "full mode: loopback hop to the user container redirected in the kernel");
            Some(FullMode { loopback })
        }
        Err(error) => {
            tracing::warn!(cgroup = %cgroup.display(), %error, "full mode: cannot attach the loopback redirect; the hop to the user container stays on TCP");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_mode_counts_the_serving_port() {
        assert_eq!(accounting_port(DataplaneMode::Full, 8012, 8080), 8012);
        assert_eq!(accounting_port(DataplaneMode::Userspace, 8012, 8080), 8080);
        assert_eq!(
            accounting_port(DataplaneMode::EventDriven, 8012, 8080),
            8080
        );
    }

    #[test]
    fn other_modes_attach_nothing() {
        let standalone = AccountingMode::Standalone(Some("/nonexistent".into()));
        assert!(attach(DataplaneMode::Userspace, &standalone, 8080).is_none());
        assert!(attach(DataplaneMode::EventDriven, &standalone, 8080).is_none());
        assert!(attach(DataplaneMode::Full, &AccountingMode::Userspace, 8080).is_none());
    }

    #[test]
    fn a_missing_cgroup_leaves_the_hop_on_tcp() {
        let standalone = AccountingMode::Standalone(Some("/nonexistent/spright".into()));
        assert!(attach(DataplaneMode::Full, &standalone, 8080).is_none());
    }
}
