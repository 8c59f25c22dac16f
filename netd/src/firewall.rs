//! Pure rendering of the node firewall: one table, `inet swarmnet`, owned by netd and replaced
//! whole in one `nft -f` transaction (the text starts by creating and deleting the table, so the
//! replace works whether or not it exists).
//!
//! What it enforces (DESIGN.md "Underlay hygiene"; CVE-2023-28840/28841/28842):
//! - VXLAN (our UDP port) is accepted only from the underlay addresses of known nodes;
//! - VXLAN is never forwarded out of a sandbox;
//! - sandboxes reach the world through the gateway bridge with masquerade.

use std::fmt::Write as _;

use crate::desired::DesiredNode;

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
