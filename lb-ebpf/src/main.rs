//! xlb's XDP programs. This file only wires the stages together; each concern lives in its
//! own module, as in Cilium's bpf/lib and Katran's lib/bpf.
#![no_std]
#![no_main]

mod bench;
mod conntrack;
mod counters;
mod csum;
mod decap;
mod drop;
mod echo;
mod egress;
mod forward_dr;
mod forward_tun;
mod icmp_error;
mod icmp_too_big;
mod log;
mod maglev;
mod maps;
mod nat;
mod nat_icmp;
mod parse;
mod refuse;
mod reply_cache;
mod reschedule;
mod service;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Global, SERVICE_F_NAT, SERVICE_F_TUN};

use crate::{drop::DropReason, forward_tun::Unfit, maps::ICMP_PROGRAM, parse::Fragment};

/// The balancer: packets for a service go to one real per flow; everything else passes.
#[xdp]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    counters::count_pass(balance(&ctx))
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let Some(pkt) = parse::parse(ctx) else {
        // Not TCP or UDP: xlb_icmp forwards ICMP errors about a service's flow. A tail call,
        // so that none of its code, stack or registers weighs on the flow path; with the slot
        // empty the frame passes, as before.
        // SAFETY: the context is the program's own; a failed tail call returns here.
        unsafe { ICMP_PROGRAM.tail_call(ctx, 0) };
        return xdp_action::XDP_PASS;
    };
    // A later fragment's ports, from its datagram's first fragment (if seen).
    let later_ports = match pkt.fragment {
        Fragment::Later => conntrack::fragment_ports(&pkt),
        _ => None,
    };
    let svc = match pkt.fragment {
        Fragment::Later => match later_ports {
            Some(ports) => service::lookup(&pkt, ports.dport),
            None => {
                // Reordered or aged out: only an all-ports service can still claim it.
                let svc = service::lookup(&pkt, 0);
                if svc.is_none() {
                    counters::global(Global::FragUntracked);
                }
                svc
            }
        },
        _ => service::lookup(&pkt, pkt.dport),
    };
    let Some(svc) = svc else {
        // Perhaps a NAT reply: its destination is a client or a SNAT address, never a VIP (the
        // control plane refuses a SNAT address that is one), so requests never look for it.
        return nat::hand_over_reply(ctx);
    };
    let Some(ingress) = egress::ingress(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let tun = svc.flags & SERVICE_F_TUN != 0;
    if tun {
        // Before scheduling: a packet that cannot be encapsulated must not become a flow.
        match forward_tun::check(ctx, &pkt, &svc) {
            Ok(()) => {}
            Err(Unfit::Malformed) => return drop::drop(ctx, DropReason::Malformed),
            Err(Unfit::TooBig(too_big)) => {
                return icmp_too_big::answer(ctx, &pkt, &too_big, ingress);
            }
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let choice = match pkt.fragment {
        Fragment::None => conntrack::select(&pkt, &svc),
        Fragment::First => {
            conntrack::remember_fragment_ports(&pkt);
            conntrack::select_fragment(&pkt, &svc)
        }
        Fragment::Later => conntrack::select_fragment(&pkt, &svc),
    };
    let Some(choice) = choice else {
        counters::service(svc.id, bytes, false);
        return drop::drop(ctx, DropReason::NoBackend);
    };
    counters::service(svc.id, bytes, choice.new_flow);
    counters::backend(choice.backend_id, bytes, choice.new_flow);
    counters::global(Global::Forwarded);
    if svc.flags & SERVICE_F_NAT != 0 {
        nat::hand_over_request(ctx, &svc, &choice)
    } else if tun {
        forward_tun::forward(ctx, &pkt, &svc, &choice)
    } else {
        forward_dr::forward(ctx, &choice.backend)
    }
}

/// NAT requests: the destination rewritten to the real the balancer chose (nat.rs).
/// Tail-called by `xlb_balancer`.
#[xdp]
pub fn xlb_nat_forward(ctx: XdpContext) -> u32 {
    nat::forward_request(&ctx)
}

/// NAT replies: the source rewritten back to the VIP (nat.rs). Tail-called by `xlb_balancer`
/// for the frames no service claims.
#[xdp]
pub fn xlb_nat_reply(ctx: XdpContext) -> u32 {
    counters::count_pass(nat::translate_reply(&ctx))
}

/// ICMP errors about NAT flows, translated for the other side (nat_icmp.rs). Tail-called by
/// `xlb_icmp`.
#[xdp]
pub fn xlb_nat_icmp(ctx: XdpContext) -> u32 {
    counters::count_pass(nat_icmp::translate_error(&ctx))
}

/// Echo requests go to `xlb_echo`, ICMP errors to a VIP go to the real of the flow they
/// quote (icmp_error.rs), a real's refusal (IPIP / IP6IP6 / 4in6) is re-scheduled to another real (reschedule.rs); everything else
/// passes. Tail-called by `xlb_balancer` for the frames that are not TCP or UDP.
#[xdp]
pub fn xlb_icmp(ctx: XdpContext) -> u32 {
    // IPIP / IP6IP6: a real's refusal of a flow (reschedule.rs).
    if let Some(tunnel) = reschedule::tunnel(&ctx) {
        return counters::count_pass(reschedule::refusal(&ctx, &tunnel));
    }
    counters::count_pass(match parse::icmp(&ctx) {
        Some((family, l3_off, icmp_off)) => {
            if echo::is_request(&ctx, family, icmp_off) {
                // SAFETY: the context is the program's own; a failed tail call returns here.
                unsafe { ICMP_PROGRAM.tail_call(&ctx, 1) };
            }
            icmp_error::forward_error(&ctx, family, l3_off, icmp_off)
        }
        None => xdp_action::XDP_PASS,
    })
}

/// Echo requests to a VIP answered (echo.rs); other echo requests pass. Tail-called by
/// `xlb_icmp`.
#[xdp]
pub fn xlb_echo(ctx: XdpContext) -> u32 {
    counters::count_pass(
        parse::icmp(&ctx)
            .and_then(|(family, l3_off, icmp_off)| echo::answer(&ctx, family, l3_off, icmp_off))
            .unwrap_or(xdp_action::XDP_PASS),
    )
}

/// The decapsulator, for real servers of TUN services: unwraps tunnelled packets for local
/// VIPs and passes them to the stack; everything else passes untouched.
#[xdp]
pub fn xlb_realserver(ctx: XdpContext) -> u32 {
    decap::decap(&ctx)
}

/// Logs a frame the balancer or `xlb_icmp` drops, then drops it: tail-called from
/// `drop::drop` only while `xlb daemon --datapath-log` is on (see log.rs).
#[xdp]
pub fn xlb_drop_log(ctx: XdpContext) -> u32 {
    log::drop_record(&ctx);
    xdp_action::XDP_DROP
}

/// A program that passes everything: the empty baseline of the benchmarks, and what a veth
/// peer needs attached for XDP_TX frames to be delivered (see the lab).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
