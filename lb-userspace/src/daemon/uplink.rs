//! How the daemon attaches to what `--iface` names: a NIC or veth as it is; a bond through
//! the kernel's bond XDP (the program runs on every member, so frames arrive with a member's
//! index); a VLAN device in generic mode (the 8021q driver has no native XDP). Modes the data
//! path cannot forward through are refused, in one line naming what works instead.

use anyhow::{Result, bail};
use rtnetlink::packet_route::link::BondMode;

use crate::{dataplane::XdpModeChoice, netlink::LinkKind};

/// How to attach to one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The XDP mode to ask for.
    pub mode: XdpModeChoice,
    /// Interfaces whose frames the program sees as its own besides the named one: a bond's
    /// members (native bond XDP runs the program on each, with the member's index).
    pub members: Vec<u32>,
    /// Said once at start, when the plan differs from a plain attach.
    pub note: Option<String>,
}

/// The plan for interface `name` of kind `kind`, the operator having asked for `choice`.
pub fn plan(name: &str, kind: &LinkKind, choice: XdpModeChoice) -> Result<Plan> {
    let plain = |note: Option<String>| Plan {
        mode: choice,
        members: Vec::new(),
        note,
    };
    match kind {
        LinkKind::Other => Ok(plain(None)),
        LinkKind::Vlan { parent } => match choice {
            XdpModeChoice::Native => bail!(
                "{name} is a VLAN device on {parent}, and VLAN devices have no native XDP: \
                 use --xdp-mode generic (or auto) on {name}"
            ),
            _ => Ok(Plan {
                mode: XdpModeChoice::Generic,
                members: Vec::new(),
                note: Some(format!(
                    "{name} is a VLAN device on {parent}: generic XDP (the 8021q driver has no native mode)"
                )),
            }),
        },
        LinkKind::Bond {
            mode,
            vlan_srcmac,
            members,
        } => {
            match mode {
                BondMode::ActiveBackup
                | BondMode::BalanceRr
                | BondMode::BalanceXor
                | BondMode::Ieee8023Ad => {}
                other => bail!(
                    "bond {name} is in mode {other}, which XDP cannot forward through (the kernel \
                     has no XDP for it, and its members use MACs of their own): use mode \
                     active-backup, 802.3ad, balance-xor or balance-rr"
                ),
            }
            if members.is_empty() {
                bail!("bond {name} has no members: enslave its interfaces first");
            }
            let names: Vec<&str> = members.iter().map(|(_, n)| n.as_str()).collect();
            if *vlan_srcmac {
                // The kernel refuses native XDP on such a bond; generic runs on the bond itself.
                return match choice {
                    XdpModeChoice::Native => bail!(
                        "bond {name} hashes transmits by vlan+srcmac, which has no native XDP: \
                         use --xdp-mode generic (or auto), or another xmit_hash_policy"
                    ),
                    _ => Ok(Plan {
                        mode: XdpModeChoice::Generic,
                        members: Vec::new(),
                        note: Some(format!(
                            "bond {name} ({mode}, vlan+srcmac, members {}): generic XDP",
                            names.join(", ")
                        )),
                    }),
                };
            }
            Ok(Plan {
                mode: choice,
                members: members.iter().map(|(i, _)| *i).collect(),
                note: Some(format!(
                    "bond {name} ({mode}, members {}): the kernel runs the program on each member",
                    names.join(", ")
                )),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bond(mode: BondMode, vlan_srcmac: bool) -> LinkKind {
        LinkKind::Bond {
            mode,
            vlan_srcmac,
            members: vec![(7, "eth0".into()), (8, "eth1".into())],
        }
    }

    #[test]
    fn plain_interfaces_attach_as_asked() {
        for choice in [
            XdpModeChoice::Auto,
            XdpModeChoice::Native,
            XdpModeChoice::Generic,
        ] {
            let p = plan("eth0", &LinkKind::Other, choice).unwrap();
            assert_eq!(p.mode, choice);
            assert!(p.members.is_empty() && p.note.is_none());
        }
    }

    #[test]
    fn bonds_in_xdp_modes_attach_with_their_members() {
        for mode in [
            BondMode::ActiveBackup,
            BondMode::Ieee8023Ad,
            BondMode::BalanceXor,
            BondMode::BalanceRr,
        ] {
            for choice in [XdpModeChoice::Auto, XdpModeChoice::Native] {
                let p = plan("bond0", &bond(mode, false), choice).unwrap();
                assert_eq!((p.mode, &p.members[..]), (choice, &[7, 8][..]), "{mode}");
            }
        }
    }

    #[test]
    fn bonds_without_xdp_are_refused_in_one_line_naming_what_works() {
        for mode in [
            BondMode::BalanceAlb,
            BondMode::BalanceTlb,
            BondMode::Broadcast,
        ] {
            let e = plan("bond0", &bond(mode, false), XdpModeChoice::Auto)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&mode.to_string()) && e.contains("use mode active-backup"));
            assert_eq!(e.lines().count(), 1);
        }
        let empty = LinkKind::Bond {
            mode: BondMode::ActiveBackup,
            vlan_srcmac: false,
            members: vec![],
        };
        assert!(plan("bond0", &empty, XdpModeChoice::Auto).is_err());
        // vlan+srcmac: generic on the bond, or refused when native is required.
        let p = plan(
            "bond0",
            &bond(BondMode::Ieee8023Ad, true),
            XdpModeChoice::Auto,
        )
        .unwrap();
        assert_eq!(p.mode, XdpModeChoice::Generic);
        assert!(p.members.is_empty());
        let e = plan(
            "bond0",
            &bond(BondMode::Ieee8023Ad, true),
            XdpModeChoice::Native,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--xdp-mode generic"));
    }

    #[test]
    fn vlan_devices_attach_generic_or_refuse_native() {
        let vlan = LinkKind::Vlan {
            parent: "eth0".into(),
        };
        let p = plan("eth0.10", &vlan, XdpModeChoice::Auto).unwrap();
        assert_eq!(p.mode, XdpModeChoice::Generic);
        let e = plan("eth0.10", &vlan, XdpModeChoice::Native)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("on eth0") && e.contains("--xdp-mode generic"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
}
