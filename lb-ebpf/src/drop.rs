//! The one way a packet is dropped: its reason is counted, logged (while the data path log is
//! on) and turned into the XDP verdict here, so that no drop site can forget one of the three.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::Global;

use crate::{counters, log};

/// Why the balancer or `xlb_icmp` drops a packet. Each reason is a `Global` counter.
#[derive(Clone, Copy)]
pub enum DropReason {
    /// The service has no usable real for the packet.
    NoBackend,
    /// A service's packet whose headers do not describe the frame.
    Malformed,
    /// Too big for the tunnel and not to be answered with ICMP.
    TooBig,
    /// A refusal of a flow bounced `MAX_BOUNCES` times already, or with no other real.
    RefusalBounced,
    /// Looks like a refusal, but not from the real its flow is tracked to.
    RefusalForged,
    /// A new full-NAT flow found no free SNAT port.
    SnatExhausted,
}

impl DropReason {
    #[inline(always)]
    fn counter(self) -> Global {
        match self {
            DropReason::NoBackend => Global::DropNoBackend,
            DropReason::Malformed => Global::DropMalformed,
            DropReason::TooBig => Global::DropTooBig,
            DropReason::RefusalBounced => Global::DropRefusalBounced,
            DropReason::RefusalForged => Global::DropRefusalForged,
            DropReason::SnatExhausted => Global::DropSnatExhausted,
        }
    }
}

/// Counts and logs the drop; returns the verdict the program returns (when the log is on, the
/// tail-called `xlb_drop_log` returns that verdict instead, and this does not return).
#[inline(always)]
pub fn drop(ctx: &XdpContext, reason: DropReason) -> u32 {
    let counter = reason.counter();
    counters::global(counter);
    log::dropped(ctx, counter);
    xdp_action::XDP_DROP
}
