//! The relay's own view of each socket a session used, in the form the
//! eBPF program's maps hold, so `tlsrelay stats` and the disagreement
//! counter can set it beside what the wire showed.

use tlsrelay_core::report::{Direction, LegSecurity, Outcome, SessionReport};
use tlsrelay_ebpf_common as wire;

/// A relay view from what was negotiated (the group only for TLS 1.3: a
/// TLS 1.2 ServerHello carries none for the wire to compare).
fn view(
    leg: Direction,
    negotiated: Option<&tlsrelay_core::report::Negotiated>,
    downgraded: bool,
    handshake_failed: bool,
    tls_off: bool,
) -> wire::RelayView {
    let (version, cipher, group) = negotiated.map_or((0, 0, 0), |n| {
        let group = if n.version_code == wire::TLS1_3 {
            n.group_code
        } else {
            0
        };
        (n.version_code, n.cipher_code, group)
    });
    wire::RelayView {
        negotiated_version: version,
        cipher_suite: cipher,
        leg: match leg {
            Direction::Inbound => wire::LEG_CLIENT,
            Direction::Outbound => wire::LEG_UPSTREAM,
        },
        downgraded: downgraded as u8,
        handshake_failed: handshake_failed as u8,
        tls_off: tls_off as u8,
        key_share_group: group,
        refused: 0,
        passthrough: 0,
    }
}

/// The relay's view of each socket a session used.
pub fn views_of(report: &SessionReport) -> Vec<(u64, wire::RelayView)> {
    let leg_view = |security: &Option<LegSecurity>, direction: Direction| {
        let negotiated = match security {
            Some(LegSecurity::Tls { negotiated, .. }) => Some(negotiated),
            _ => None,
        };
        view(
            direction,
            negotiated,
            report.downgraded(direction).is_some(),
            report.tls_failure(direction).is_some(),
            report.tls_off.contains(&direction),
        )
    };
    let mut views = Vec::new();
    if let Some(p) = &report.passthrough {
        // Both legs carry the client's and the server's own TLS.
        let pass = |leg: Direction| {
            let mut v = view(leg, None, false, false, false);
            v.negotiated_version = p.version_code;
            v.cipher_suite = p.cipher_code;
            v.key_share_group = if p.version_code == wire::TLS1_3 {
                p.group_code
            } else {
                0
            };
            v.passthrough = 1;
            v
        };
        views.extend(report.client_cookie.map(|c| (c, pass(Direction::Inbound))));
        views.extend(report.sockets.iter().map(|s| (s.cookie, pass(s.leg))));
        return views;
    }
    if let Some(c) = report.client_cookie {
        let mut client = leg_view(&report.inbound, Direction::Inbound);
        client.refused = matches!(
            report.outcome,
            Outcome::Refused {
                leg: Direction::Inbound,
                ..
            }
        ) as u8;
        views.push((c, client));
    }
    views.extend(report.sockets.iter().map(|s| {
        (
            s.cookie,
            view(
                s.leg,
                s.negotiated.as_ref(),
                s.downgraded,
                s.handshake_failed,
                s.tls_off,
            ),
        )
    }));
    views
}
