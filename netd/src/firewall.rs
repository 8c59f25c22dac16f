//! Pure rendering of the node firewall: one table, `inet swarmnet`, owned by netd and replaced
//! whole in one `nft -f` transaction (the text starts by creating and deleting the table, so the
//! replace works whether or not it exists).
//!
//! What it enforces (DESIGN.md "Underlay hygiene"; CVE-2023-28840/28841/28842):
//! - VXLAN (our UDP port) is accepted only from the underlay addresses of known nodes;
//! - VXLAN is never forwarded out of a sandbox;
//! - sandboxes reach the world through the gateway bridge with masquerade;
//! - published ports are DNATed to the routing mesh (a service's ingress VIP, or a local task's
//!   share of it straight: [`crate::mesh`]) or a local task.

/// The ingress sandbox's own table: forwarded published traffic, balanced by the ingress
/// network's load balancer in the same namespace (table `ip swarmnet-lb`), leaves into the
/// ingress network masqueraded as the sandbox's address there, so the replies of a task on any
/// node come back through this node (and its conntrack undoes the DNATs).
pub const INGRESS_TABLE: &str = "swarmnet-ingress";

/// Renders the ingress sandbox's table (replaced whole, like the node's).
pub fn render_ingress(out_if: &str) -> String {
    format!(
        "table ip {INGRESS_TABLE}\ndelete table ip {INGRESS_TABLE}\ntable ip {INGRESS_TABLE} {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"{out_if}\" masquerade comment \"routing mesh: replies come back through this node\"\n\t}}\n}}\n"
    )
}

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use swarmnet_model::spec::Protocol;

use crate::desired::{DesiredNode, PublishTarget, PublishedPort};

/// The `dnat ip to` argument: one address and port, or a random pick among slots
/// (`numgen random mod N map { 0 : a, 1 : b }:port`; every slot has the same port: a local
/// task's gateway address or the service's ingress VIP, both at the target port).
fn dnat_target(t: &PublishTarget) -> String {
    match t {
        PublishTarget::Mesh {
            vip,
            direct,
            via_sandbox,
        } => {
            if direct.is_empty() {
                return vip.to_string();
            }
            // One slot per healthy task: the local ones straight, the rest through the ingress
            // sandbox (crate::mesh), so every task gets the same share.
            let slots: Vec<Ipv4Addr> = direct
                .iter()
                .map(|a| *a.ip())
                .chain(std::iter::repeat_n(*vip.ip(), *via_sandbox))
                .collect();
            pick(&slots, vip.port())
        }
        PublishTarget::Local(to) => {
            let ips: Vec<Ipv4Addr> = to.iter().map(|a| *a.ip()).collect();
            pick(&ips, to.first().map_or(0, |a| a.port()))
        }
    }
}

/// `ip:port` for one slot, a `numgen` map for several.
fn pick(slots: &[Ipv4Addr], port: u16) -> String {
    match slots {
        [one] => format!("{one}:{port}"),
        many => {
            let elems: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{i} : {a}"))
                .collect();
            format!(
                "numgen random mod {} map {{ {} }}:{port}",
                many.len(),
                elems.join(", ")
            )
        }
    }
}

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "swarmnet";

/// Renders the whole table. Deterministic: same input, same bytes (golden-tested).
pub fn render(d: &DesiredNode) -> String {
    let mut s = String::new();
    let port = d.vxlan_port;
    let _ = writeln!(s, "table {FAMILY} {TABLE}");
    let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(s, "\tset vteps {{");
    let _ = writeln!(s, "\t\ttype ipv4_addr");
    if !d.vteps.is_empty() {
        let list: Vec<String> = d.vteps.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "\t\telements = {{ {} }}", list.join(", "));
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook input priority filter - 5; policy accept;"
    );
    let _ = writeln!(
        s,
        "\t\tudp dport {port} ip saddr != @vteps counter drop comment \"VXLAN only from known nodes\""
    );
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain forward {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook forward priority filter - 5; policy accept;"
    );
    let _ = writeln!(
        s,
        "\t\tiifname \"sng*\" udp dport {port} counter drop comment \"no VXLAN from sandboxes\""
    );
    let _ = writeln!(s, "\t}}");
    // Published ports: traffic to any of the node's own addresses (not loopback: without
    // route_localnet, which we never set, a DNATed 127.0.0.1 packet would be dropped, so a
    // connection to 127.0.0.1:<port> is refused instead) goes to the service's ingress VIP
    // through the ingress sandbox (routing mesh) or straight to local tasks (host mode, local
    // traffic policy). Both hooks: prerouting for other hosts, output for the node itself.
    let (forwarded, refused): (Vec<&PublishedPort>, Vec<&PublishedPort>) = d
        .published
        .iter()
        .partition(|p| !matches!(&p.target, PublishTarget::Local(to) if to.is_empty()));
    if !refused.is_empty() {
        // A local-policy port on a node without a local task refuses at once. In a filter
        // chain before DNAT (a reject in a nat chain never fires); TCP gets a reset, UDP an
        // ICMP port-unreachable.
        for (chain, hook, priority) in [
            ("refuse_in", "prerouting", "dstnat - 10"),
            ("refuse_out", "output", "-110"),
        ] {
            let _ = writeln!(s, "\tchain {chain} {{");
            let _ = writeln!(
                s,
                "\t\ttype filter hook {hook} priority {priority}; policy accept;"
            );
            for p in &refused {
                let reject = match p.proto {
                    Protocol::Tcp => "reject with tcp reset",
                    Protocol::Udp => "reject",
                };
                let _ = writeln!(
                    s,
                    "\t\tfib daddr type local ip daddr != 127.0.0.0/8 {} dport {} counter {reject} comment \"{} published by {}: no local task (local traffic policy)\"",
                    p.proto, p.port, p.port, p.service
                );
            }
            let _ = writeln!(s, "\t}}");
        }
    }
    if !forwarded.is_empty() {
        // nft names the dstnat priority (-100) only in prerouting; output takes the number.
        for (chain, priority) in [("prerouting", "dstnat"), ("output", "-100")] {
            let _ = writeln!(s, "\tchain {chain} {{");
            let _ = writeln!(
                s,
                "\t\ttype nat hook {chain} priority {priority}; policy accept;"
            );
            for p in &forwarded {
                let _ = writeln!(
                    s,
                    "\t\tfib daddr type local ip daddr != 127.0.0.0/8 {} dport {} dnat ip to {} comment \"{} published by {}\"",
                    p.proto,
                    p.port,
                    dnat_target(&p.target),
                    p.port,
                    p.service
                );
            }
            let _ = writeln!(s, "\t}}");
        }
    }
    if let Some(gw) = &d.gw_bridge {
        let _ = writeln!(s, "\tchain postrouting {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(
            s,
            "\t\tip saddr {} oifname != \"{}\" masquerade comment \"sandbox egress\"",
            gw.addr.trunc(),
            gw.name
        );
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}
