//! The outbound address policy: which addresses herald may dial.
//!
//! Every outbound connection (deliveries, token refreshes, partner tokens
//! minted from a key's `token_uri`, link callback and token URLs) goes
//! through [`check`] at connect time, after name resolution and for IP
//! literals alike (see `dispatch::client`), so what a config, a link or a
//! key names cannot reach herald's own network unless the partner says
//! `allow_private = true`. The same function also checks IP literals when a
//! config is read or a link is put, for an early, named error.
//!
//! An IPv6 address that carries an IPv4 one (IPv4-mapped, IPv4-compatible,
//! NAT64, 6to4, Teredo) is judged by the IPv4 address it carries: a
//! gateway or the kernel may turn it into exactly that.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// A range herald does not dial to by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub net: Net,
    pub name: &'static str,
    /// Never a partner's address, whatever `allow_private` says (nothing
    /// answers a TCP connection there, or it would be herald itself).
    pub never: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Net::V4(n) => n.fmt(f),
            Net::V6(n) => n.fmt(f),
        }
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, name: &'static str, never: bool) -> Range {
    Range {
        net: Net::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)),
        name,
        never,
    }
}

const fn v6(segments: [u16; 8], len: u8, name: &'static str, never: bool) -> Range {
    let [a, b, c, d, e, f, g, h] = segments;
    Range {
        net: Net::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(a, b, c, d, e, f, g, h),
            len,
        )),
        name,
        never,
    }
}

/// IANA's special-purpose IPv4 ranges that are not globally reachable,
/// most specific first (broadcast lies inside 240.0.0.0/4).
const V4_RANGES: &[Range] = &[
    v4(255, 255, 255, 255, 32, "broadcast", true),
    v4(0, 0, 0, 0, 8, "\"this network\", unspecified", true),
    v4(10, 0, 0, 0, 8, "private, RFC 1918", false),
    v4(
        100,
        64,
        0,
        0,
        10,
        "shared address space, carrier-grade NAT",
        false,
    ),
    v4(127, 0, 0, 0, 8, "loopback", false),
    v4(169, 254, 0, 0, 16, "link-local", false),
    v4(172, 16, 0, 0, 12, "private, RFC 1918", false),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments", false),
    v4(192, 0, 2, 0, 24, "documentation, TEST-NET-1", false),
    v4(192, 88, 99, 0, 24, "6to4 relay anycast, deprecated", false),
    v4(192, 168, 0, 0, 16, "private, RFC 1918", false),
    v4(198, 18, 0, 0, 15, "benchmarking", false),
    v4(198, 51, 100, 0, 24, "documentation, TEST-NET-2", false),
    v4(203, 0, 113, 0, 24, "documentation, TEST-NET-3", false),
    v4(224, 0, 0, 0, 4, "multicast", true),
    v4(240, 0, 0, 0, 4, "reserved", false),
];

const V6_UNSPECIFIED: Range = v6([0; 8], 128, "unspecified", true);
const V6_LOOPBACK: Range = v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback", false);

/// IPv6 ranges that are not globally reachable, after the forms that carry
/// an IPv4 address are taken out. The last is everything outside global
/// unicast 2000::/3 (what is left there is unassigned or reserved).
const V6_RANGES: &[Range] = &[
    v6([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only", false),
    v6(
        [0x2001, 0x0002, 0, 0, 0, 0, 0, 0],
        48,
        "benchmarking",
        false,
    ),
    v6(
        [0x2001, 0x0010, 0, 0, 0, 0, 0, 0],
        28,
        "ORCHID, deprecated",
        false,
    ),
    v6(
        [0x2001, 0x0db8, 0, 0, 0, 0, 0, 0],
        32,
        "documentation",
        false,
    ),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation", false),
    v6(
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing SIDs",
        false,
    ),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local", false),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local", false),
    v6(
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        "site-local, deprecated",
        false,
    ),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast", true),
];

const V6_NOT_GLOBAL: Range = v6(
    [0; 8],
    0,
    "outside global unicast 2000::/3, reserved",
    false,
);
const V6_GLOBAL_UNICAST: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3);

/// IPv6 forms that carry an IPv4 address, and where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// `::ffff:0:0/96`
    Mapped,
    /// `::ffff:0:0:0/96` (SIIT)
    Translated,
    /// `::/96`, deprecated (`::127.0.0.1`)
    Compatible,
    /// `64:ff9b::/96`
    Nat64,
    /// `64:ff9b:1::/48`
    Nat64Local,
    /// `2002::/16`
    SixToFour,
    /// `2001::/32`, the server's address
    TeredoServer,
    /// `2001::/32`, the client's address (stored inverted)
    TeredoClient,
}

impl Carrier {
    fn describe(self) -> &'static str {
        match self {
            Carrier::Mapped => "IPv4-mapped, ::ffff:0:0/96",
            Carrier::Translated => "IPv4-translated, ::ffff:0:0:0/96",
            Carrier::Compatible => "IPv4-compatible, ::/96",
            Carrier::Nat64 => "NAT64, 64:ff9b::/96",
            Carrier::Nat64Local => "local NAT64, 64:ff9b:1::/48",
            Carrier::SixToFour => "6to4, 2002::/16",
            Carrier::TeredoServer => "Teredo server, 2001::/32",
            Carrier::TeredoClient => "Teredo client, 2001::/32",
        }
    }
}

/// The IPv4 addresses `ip` carries, with the form that carries each.
pub fn carried(ip: Ipv6Addr) -> Vec<(Carrier, Ipv4Addr)> {
    let s = ip.segments();
    let bits = u128::from(ip);
    let low = Ipv4Addr::from(bits as u32);
    let mut found = Vec::new();
    if s[..5] == [0; 5] && s[5] == 0xffff {
        found.push((Carrier::Mapped, low));
    } else if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        found.push((Carrier::Translated, low));
    } else if s[..6] == [0; 6] && bits > 1 {
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        found.push((Carrier::Compatible, low));
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        found.push((Carrier::Nat64, low));
    } else if s[..3] == [0x64, 0xff9b, 1] {
        found.push((Carrier::Nat64Local, low));
    } else if s[0] == 0x2002 {
        found.push((Carrier::SixToFour, Ipv4Addr::from((bits >> 80) as u32)));
    } else if s[..2] == [0x2001, 0] {
        found.push((Carrier::TeredoServer, Ipv4Addr::from((bits >> 64) as u32)));
        found.push((Carrier::TeredoClient, Ipv4Addr::from(!(bits as u32))));
    }
    found
}

/// Why `ip` is not an ordinary public address: the range it is in, and,
/// for a form that carries an IPv4 address, which one put it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special {
    pub range: &'static Range,
    pub via: Option<(Carrier, Ipv4Addr)>,
}

/// The special range `ip` falls in; `None` for a globally reachable address.
pub fn special(ip: IpAddr) -> Option<Special> {
    match ip {
        IpAddr::V4(ip) => v4_range(ip).map(|range| Special { range, via: None }),
        IpAddr::V6(ip) => {
            if ip.is_unspecified() {
                return Some(Special {
                    range: &V6_UNSPECIFIED,
                    via: None,
                });
            }
            if ip.is_loopback() {
                return Some(Special {
                    range: &V6_LOOPBACK,
                    via: None,
                });
            }
            let carried = carried(ip);
            if !carried.is_empty() {
                // Judged by what it carries; the worst of them for Teredo.
                let mut specials: Vec<Special> = carried
                    .into_iter()
                    .filter_map(|(form, v4)| {
                        v4_range(v4).map(|range| Special {
                            range,
                            via: Some((form, v4)),
                        })
                    })
                    .collect();
                specials.sort_by_key(|s| !s.range.never);
                return specials.into_iter().next();
            }
            let range = V6_RANGES
                .iter()
                .find(|r| matches!(r.net, Net::V6(n) if n.contains(&ip)));
            if let Some(range) = range {
                return Some(Special { range, via: None });
            }
            (!V6_GLOBAL_UNICAST.contains(&ip)).then_some(Special {
                range: &V6_NOT_GLOBAL,
                via: None,
            })
        }
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static Range> {
    V4_RANGES
        .iter()
        .find(|r| matches!(r.net, Net::V4(n) if n.contains(&ip)))
}

/// Whether herald may dial `ip` for a partner with `allow_private`.
/// `allow_private = true` opens every special range but those no partner
/// can be at (unspecified, multicast, broadcast).
pub fn check(ip: IpAddr, allow_private: bool) -> Result<(), Refused> {
    match special(ip) {
        Some(special) if special.range.never || !allow_private => Err(Refused { ip, special }),
        _ => Ok(()),
    }
}

/// An address the policy refuses, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub ip: IpAddr,
    pub special: Special,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = self.special.range;
        write!(f, "{}", self.ip)?;
        if let Some((form, v4)) = self.special.via {
            write!(f, " carries {v4} ({})", form.describe())?;
        }
        write!(f, " in {} ({})", range.net, range.name)?;
        if range.never {
            write!(f, ", which herald never dials")
        } else {
            write!(
                f,
                ", which herald dials only for a partner with allow_private = true"
            )
        }
    }
}

/// A connection herald did not open: the host asked for and every address
/// it stood for, refused. What the attempt log and the dead letter say.
#[derive(Debug, Clone)]
pub struct NotDialled {
    pub host: String,
    pub refused: Vec<Refused>,
}

impl fmt::Display for NotDialled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reasons: Vec<String> = self.refused.iter().map(Refused::to_string).collect();
        let literal = self.refused.len() == 1 && self.refused[0].ip.to_string() == self.host;
        if literal || self.refused.is_empty() {
            write!(f, "not sent: the outbound address policy refuses ")?;
        } else {
            write!(
                f,
                "not sent: {} resolves only to addresses the outbound address policy refuses: ",
                self.host
            )?;
        }
        write!(f, "{}", reasons.join("; "))
    }
}

impl std::error::Error for NotDialled {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    /// (address, range it is in or `None` when public, refused even with
    /// allow_private = true)
    const TABLE: &[(&str, Option<&str>, bool)] = &[
        ("8.8.8.8", None, false),
        ("1.1.1.1", None, false),
        ("2606:4700::1111", None, false),
        ("2a00:1450:4001::200e", None, false),
        ("127.0.0.1", Some("127.0.0.0/8"), false),
        ("127.255.255.254", Some("127.0.0.0/8"), false),
        ("10.1.2.3", Some("10.0.0.0/8"), false),
        ("172.16.0.1", Some("172.16.0.0/12"), false),
        ("172.31.255.255", Some("172.16.0.0/12"), false),
        ("172.32.0.1", None, false),
        ("192.168.1.1", Some("192.168.0.0/16"), false),
        ("169.254.169.254", Some("169.254.0.0/16"), false),
        ("100.64.0.1", Some("100.64.0.0/10"), false),
        ("100.127.255.255", Some("100.64.0.0/10"), false),
        ("100.128.0.1", None, false),
        ("198.18.0.1", Some("198.18.0.0/15"), false),
        ("198.19.255.255", Some("198.18.0.0/15"), false),
        ("198.20.0.1", None, false),
        ("192.0.0.8", Some("192.0.0.0/24"), false),
        ("192.0.2.1", Some("192.0.2.0/24"), false),
        ("198.51.100.7", Some("198.51.100.0/24"), false),
        ("203.0.113.9", Some("203.0.113.0/24"), false),
        ("192.88.99.1", Some("192.88.99.0/24"), false),
        ("255.255.255.255", Some("255.255.255.255/32"), true),
        ("224.0.0.1", Some("224.0.0.0/4"), true),
        ("239.255.255.250", Some("224.0.0.0/4"), true),
        ("0.0.0.0", Some("0.0.0.0/8"), true),
        ("0.1.2.3", Some("0.0.0.0/8"), true),
        ("240.0.0.1", Some("240.0.0.0/4"), false),
        ("::", Some("::/128"), true),
        ("::1", Some("::1/128"), false),
        ("fc00::1", Some("fc00::/7"), false),
        ("fd12:3456::1", Some("fc00::/7"), false),
        ("fe80::1", Some("fe80::/10"), false),
        ("febf::1", Some("fe80::/10"), false),
        ("fec0::1", Some("fec0::/10"), false),
        ("ff02::1", Some("ff00::/8"), true),
        ("2001:db8::1", Some("2001:db8::/32"), false),
        ("3fff::1", Some("3fff::/20"), false),
        ("100::1", Some("100::/64"), false),
        ("2001:2::1", Some("2001:2::/48"), false),
        ("::ffff:127.0.0.1", Some("127.0.0.0/8"), false),
        ("::ffff:10.0.0.1", Some("10.0.0.0/8"), false),
        ("::ffff:8.8.8.8", None, false),
        ("::ffff:0:127.0.0.1", Some("127.0.0.0/8"), false),
        ("::127.0.0.1", Some("127.0.0.0/8"), false),
        ("::169.254.169.254", Some("169.254.0.0/16"), false),
        ("64:ff9b::127.0.0.1", Some("127.0.0.0/8"), false),
        ("64:ff9b::10.0.0.1", Some("10.0.0.0/8"), false),
        ("64:ff9b::8.8.8.8", None, false),
        ("64:ff9b:1::192.168.0.1", Some("192.168.0.0/16"), false),
        ("2002:7f00:1::", Some("127.0.0.0/8"), false),
        ("2002:c0a8:101::1", Some("192.168.0.0/16"), false),
        ("2002:808:808::1", None, false),
        // Teredo: server 127.0.0.1, client 8.8.8.8 (inverted: f7f7:f7f7).
        ("2001:0:7f00:1::f7f7:f7f7", Some("127.0.0.0/8"), false),
        // Teredo: server 8.8.8.8, client 10.0.0.1 (inverted: f5ff:fffe).
        ("2001:0:808:808::f5ff:fffe", Some("10.0.0.0/8"), false),
        ("2001:0:808:808::f7f7:f7f7", None, false),
        ("::ffff:224.0.0.1", Some("224.0.0.0/4"), true),
        ("4000::1", Some("::/0"), false),
    ];

    #[test]
    fn every_address_in_the_table_gets_its_verdict_and_range() {
        for &(text, range, never) in TABLE {
            let found = special(ip(text));
            assert_eq!(
                found.map(|s| s.range.net.to_string()).as_deref(),
                range,
                "{text}"
            );
            let public = range.is_none();
            assert_eq!(check(ip(text), false).is_ok(), public, "{text}");
            assert_eq!(check(ip(text), true).is_ok(), !never, "{text}");
        }
    }

    #[test]
    fn a_refusal_names_the_address_the_carried_address_and_the_range() {
        let refused = check(ip("::127.0.0.1"), false).expect_err("refused");
        assert_eq!(
            refused.to_string(),
            "::7f00:1 carries 127.0.0.1 (IPv4-compatible, ::/96) in 127.0.0.0/8 (loopback), which herald dials only for a partner with allow_private = true"
        );
        let refused = check(ip("224.0.0.1"), true).expect_err("refused");
        assert_eq!(
            refused.to_string(),
            "224.0.0.1 in 224.0.0.0/4 (multicast), which herald never dials"
        );
    }

    /// Every IPv6 form that carries `v4`, with the address it is.
    fn embeddings(v4: Ipv4Addr) -> Vec<(&'static str, Ipv6Addr)> {
        let bits = u128::from(u32::from(v4));
        let public_v4 = u128::from(u32::from(Ipv4Addr::new(8, 8, 8, 8)));
        let mut forms = vec![
            ("mapped", v4.to_ipv6_mapped()),
            ("translated", Ipv6Addr::from((0xffff_u128 << 48) | bits)),
            ("nat64", Ipv6Addr::from((0x64_ff9b_u128 << 96) | bits)),
            (
                "nat64 local",
                Ipv6Addr::from((0x64_ff9b_0001_u128 << 80) | (0xabcd_u128 << 32) | bits),
            ),
            (
                "6to4",
                Ipv6Addr::from((0x2002_u128 << 112) | (bits << 80) | 1),
            ),
            (
                "teredo server",
                Ipv6Addr::from((0x2001_u128 << 112) | (bits << 64) | (!public_v4 & 0xffff_ffff)),
            ),
            (
                "teredo client",
                Ipv6Addr::from((0x2001_u128 << 112) | (public_v4 << 64) | (!bits & 0xffff_ffff)),
            ),
        ];
        // ::0.0.0.0 and ::0.0.0.1 are IPv6's own unspecified and loopback
        // addresses, judged as such.
        if bits > 1 {
            forms.push(("compatible", Ipv6Addr::from(bits)));
        }
        forms
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn every_ipv4_address_gets_the_same_verdict_in_every_form_that_carries_it(raw in any::<u32>()) {
            let v4 = Ipv4Addr::from(raw);
            let expected = (check(IpAddr::V4(v4), false).is_ok(), check(IpAddr::V4(v4), true).is_ok());
            let range = special(IpAddr::V4(v4)).map(|s| s.range);
            for (form, v6) in embeddings(v4) {
                let got = (check(IpAddr::V6(v6), false).is_ok(), check(IpAddr::V6(v6), true).is_ok());
                prop_assert_eq!(got, expected, "{} as {} ({})", v4, form, v6);
                prop_assert_eq!(special(IpAddr::V6(v6)).map(|s| s.range), range, "{} as {}", v4, form);
            }
        }
    }

    #[test]
    fn the_ranges_the_embedding_property_most_needs_are_covered() {
        // proptest draws at random; these are the edges of each range.
        for edge in [
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(0, 0, 0, 2),
            Ipv4Addr::new(198, 18, 0, 0),
            Ipv4Addr::new(198, 19, 255, 255),
            Ipv4Addr::new(100, 64, 0, 0),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(169, 254, 169, 254),
        ] {
            for (form, v6) in embeddings(edge) {
                assert_eq!(
                    special(IpAddr::V6(v6)).map(|s| s.range),
                    special(IpAddr::V4(edge)).map(|s| s.range),
                    "{edge} as {form}"
                );
                assert!(check(IpAddr::V6(v6), false).is_err(), "{edge} as {form}");
            }
        }
    }
}
