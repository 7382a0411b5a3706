//! Invalid configurations, each with the exact error an operator sees:
//! file, line, field and what is wrong. Also the checks that need files
//! (certificates, keys, trust anchors).

use tlsrelay::plan::{Plan, SelfSignedSource};
use tlsrelay_core::config::Config;
use tlsrelay_tests::{toml_path, Pki};

const GOOD_TAIL: &str = r#"
[[upstreams]]
name = "up"
address = "127.0.0.1:9"
"#;

fn listener(body: &str) -> String {
    format!("[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\n{body}\n{GOOD_TAIL}")
}

/// A mail edge: accepted domains, one smtp listener, one outbound
/// connector; `top` goes before the tables, `tail` after them.
fn mail_edge(top: &str, tail: &str) -> String {
    format!("{top}\naccepted_domains = [\"example.org\"]\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\n\n[[outbound_connectors]]\nname = \"out\"\nrecipient_domains = [\"*\"]\nnext_hops = [\"127.0.0.1:25\"]\n\n{tail}")
}

fn error_of(text: &str) -> String {
    match Config::parse(text, "relay.toml", std::env::temp_dir()) {
        Ok(config) => match Plan::build(&config, SelfSignedSource::Ephemeral) {
            Ok(_) => panic!("config unexpectedly valid:\n{text}"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_configs_name_file_line_and_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\nservers = [\"127.0.0.1:10\"]"),
            "relay.toml:9: upstreams[0].address: give address (one server) or servers (a pool), not both",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "balance = \"first\""),
            "relay.toml:8: upstreams[0]: needs address = \"host:port\" or servers = [...]",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "servers = [{ address = \"127.0.0.1:9\", weight = 0 }]"),
            "relay.toml:9: upstreams[0].servers[0].weight: must be between 1 and 256",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "servers = [\"127.0.0.1:9\", \"127.0.0.1:9\"]"),
            "relay.toml:9: upstreams[0].servers[1]: 127.0.0.1:9 is listed twice",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "servers = [{ address = \"127.0.0.1:9\", backup = true }]"),
            "relay.toml:9: upstreams[0].servers: every server is a backup: a backup serves only while the others are down",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "servers = [\"127.0.0.1:9\"]\nbalance = \"random\""),
            "relay.toml:10: upstreams[0].balance: unknown balance 'random', expected one of round-robin, least-connections, first, hash-client, hash-sni",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ntls.policy = \"plain\"\ncheck = { tls = true }"),
            "relay.toml:8: upstreams[0].check.tls: a TLS check needs tls.policy opportunistic or required, not plain",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ncheck = { rise = 0 }"),
            "relay.toml:8: upstreams[0].check.rise: must be at least 1",
        ),
        (
            listener("tls.mode = \"off\"\n[[listeners.routes]]\nsni = [\"a.example\"]\nupstream = \"up\""),
            "relay.toml:8: listeners[0].routes[0]: routes read the client's TLS hello: tls.mode off sees none",
        ),
        (
            listener("[[listeners.routes]]\nsni = [\"a.example\"]\nupstream = \"nowhere\""),
            "relay.toml:7: listeners[0].routes[0].upstream: no upstream named 'nowhere'",
        ),
        (
            listener("[[listeners.routes]]\nsni = [\"a.*.example\"]\nupstream = \"up\""),
            "relay.toml:7: listeners[0].routes[0].sni: 'a.*.example' is not a server name or *.suffix",
        ),
        (
            listener("access.rate = 0"),
            "relay.toml:2: listeners[0].access.rate: must be more than 0 per second",
        ),
        (
            listener("access.rate = 5.0\naccess.burst = 0"),
            "relay.toml:2: listeners[0].access.burst: must be at least 1",
        ),
        (
            listener("tls.ticket_keys = \"/nonexistent/tickets.keys\""),
            "relay.toml:5: listeners[0].tls.ticket_keys: /nonexistent/tickets.keys: No such file or directory (os error 2)",
        ),
        (
            mail_edge("", "").replace("hostname = \"relay.test\"\n", ""),
            "relay.toml:5: listeners[0].hostname: an smtp listener needs a hostname: the name in its greeting, EHLO reply and Received lines (this machine's own name could be an internal one)",
        ),
        (
            listener("proxy_protocol = true"),
            "relay.toml:5: listeners[0].proxy_protocol_from: proxy_protocol = true needs the balancers' addresses (e.g. [\"10.0.0.0/24\"]): a header from anyone else would let them name any client",
        ),
        (
            listener("proxy_protocol = true\nproxy_protocol_from = [\"0.0.0.0/0\"]"),
            "relay.toml:5: listeners[0].proxy_protocol_from: every address may not send a PROXY protocol header: name the balancers",
        ),
        (
            listener("proxy_protocol_from = [\"10.0.0.0/24\"]"),
            "relay.toml:2: listeners[0].proxy_protocol_from: is only meaningful with proxy_protocol = true",
        ),
        (
            mail_edge("", "").replace(
                "next_hops = [\"127.0.0.1:25\"]\n",
                "next_hops = [\"127.0.0.1:25\"]\nallow_private_mx = [\"10.0.0.0/8\"]\n",
            ),
            "relay.toml:14: outbound_connectors[0].allow_private_mx: only MX delivery (next_hops = [\"mx\"]) is kept from private networks; fixed next hops go where they say",
        ),
        (
            listener("tls.mode = \"opportunstic\""),
            "relay.toml:5: listeners[0].tls.mode: unknown mode 'opportunstic', expected one of off, opportunistic, required, implicit",
        ),
        (
            listener("").replace(
                "address = \"127.0.0.1:9\"",
                "address = \"127.0.0.1:9\"\nsend_proxy_protocol = \"v3\"",
            ),
            "relay.toml:10: upstreams[0].send_proxy_protocol: unknown PROXY protocol version 'v3', expected one of v1, v2",
        ),
        (
            listener("protocol = \"pop3\""),
            "relay.toml:5: listeners[0].protocol: unknown protocol 'pop3', expected one of tcp, smtp",
        ),
        (
            listener("protocol = \"smtp\""),
            "relay.toml:4: listeners[0].upstream: smtp listeners route by recipient through outbound_connectors, not an upstream",
        ),
        (
            "[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\n".to_string(),
            "relay.toml:2: listeners[0]: an smtp listener needs at least one [[outbound_connectors]]",
        ),
        (
            "[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\n\n[[outbound_connectors]]\nname = \"out\"\nrecipient_domains = [\"bad domain\"]\nnext_hops = [\"127.0.0.1:25\"]\n".to_string(),
            "relay.toml:9: outbound_connectors[0].recipient_domains[0]: invalid domain 'bad domain', expected example.org, .example.org (subdomains) or *",
        ),
        (
            mail_edge("", "[[inbound_connectors]]\nname = \"partner\"\nclient_addresses = [\"10.0.0.0/33\"]\n"),
            "relay.toml:17: inbound_connectors[0].client_addresses[0]: invalid address range '10.0.0.0/33', expected e.g. 192.0.2.0/24",
        ),
        (
            mail_edge("", "").replace("accepted_domains = [\"example.org\"]", ""),
            "relay.toml:5: listeners[0]: an smtp listener needs accepted_domains or an inbound connector with allow_relay = true: as configured it refuses every recipient",
        ),
        (
            mail_edge("", "").replace("[\"example.org\"]", "[\"example.org\",\n  \"*\"]"),
            "relay.toml:3: accepted_domains[1]: '*' accepts mail for every domain from anyone: an open relay; open_relay = true allows it (for a lab, never on the Internet)",
        ),
        (
            mail_edge("", "[[inbound_connectors]]\nname = \"lab\"\ntls = \"required\"\nallow_relay = true\n"),
            "relay.toml:18: inbound_connectors[0].allow_relay: lets any client relay to any domain (an open relay): limit it with client_addresses, or with client_certificate = \"required\" and certificate_names; open_relay = true allows it (for a lab, never on the Internet)",
        ),
        (
            mail_edge("", "[[inbound_connectors]]\nname = \"lab\"\nclient_addresses = [\"10.0.0.0/8\", \"::/0\"]\nallow_relay = true\n"),
            "relay.toml:18: inbound_connectors[0].allow_relay: lets any client relay to any domain (an open relay): limit it with client_addresses, or with client_certificate = \"required\" and certificate_names; open_relay = true allows it (for a lab, never on the Internet)",
        ),
        (
            mail_edge("", "[[inbound_connectors]]\nname = \"partner\"\nclient_addresses = [\"192.0.2.0/24\"]\nsender_domains = [\"partner.example\", \"*\"]\n"),
            "relay.toml:18: inbound_connectors[0].sender_domains[1]: '*' would claim every sender; name the partner's domains",
        ),
        (
            mail_edge("", "[[inbound_connectors]]\nname = \"partner\"\ncertificate_names = [\"mail.partner.example\"]\n"),
            "relay.toml:16: inbound_connectors[0].trust_anchors: client certificates need trust_anchors",
        ),
        (
            listener("tls.min_version = \"1.1\""),
            "relay.toml:5: listeners[0].tls.min_version: unsupported minimum version '1.1', expected \"1.2\" or \"1.3\" (TLS 1.0 and 1.1 are never allowed)",
        ),
        (
            listener("colour = \"blue\""),
            "relay.toml:5: listeners[0].colour: unknown field `colour`, expected one of `name`, `address`, `protocol`, `upstream`, `tls`, `hostname`, `max_message_size`, `max_hops`, `proxy_protocol`, `proxy_protocol_from`, `routes`, `access`",
        ),
        (
            "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:99999\"\nupstream = \"up\"\n".to_string() + GOOD_TAIL,
            "relay.toml:3: listeners[0].address: invalid address '127.0.0.1:99999', expected ip:port or [ipv6]:port",
        ),
        (
            "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\n".to_string() + GOOD_TAIL,
            "relay.toml:2: listeners[0]: missing field `upstream`",
        ),
        (
            "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nupstream = \"nowhere\"\n".to_string() + GOOD_TAIL,
            "relay.toml:4: listeners[0].upstream: no upstream named 'nowhere' (defined: up)",
        ),
        (
            listener("").replace("127.0.0.1:9", "mx.example"),
            "relay.toml:9: upstreams[0].address: invalid address 'mx.example', expected host:port or [ipv6]:port",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ntls.policy = \"forced\""),
            "relay.toml:10: upstreams[0].tls.policy: unknown policy 'forced', expected one of plain, opportunistic, required",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ntls.verify = \"chain\""),
            "relay.toml:10: upstreams[0].tls.verify: unknown verification level 'chain', expected one of encryption-only, certificate, name",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ntls.policy = \"plain\"\ntls.verify = \"name\""),
            "relay.toml:11: upstreams[0].tls.verify: a verification level needs policy opportunistic or required, not plain",
        ),
        (
            listener("").replace("address = \"127.0.0.1:9\"", "address = \"127.0.0.1:9\"\ntls.names = [\"bad name\"]"),
            "relay.toml:10: upstreams[0].tls.names[0]: invalid certificate name pattern 'bad name', expected a host name or *.domain",
        ),
        (
            listener("") + "[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:10\"\n",
            "relay.toml:11: upstreams[1].name: duplicate upstream name 'up'",
        ),
        (
            listener("tls.mode = \"off\"\ntls.client_auth = { mode = \"required\", trust_anchors = \"ca.pem\" }"),
            "relay.toml:2: listeners[0].tls.client_auth: client certificates need TLS, but tls.mode is off",
        ),
        (
            listener("tls.client_auth = { mode = \"sometimes\", trust_anchors = \"ca.pem\" }"),
            "relay.toml:5: listeners[0].tls.client_auth.mode: unknown client certificate mode 'sometimes', expected one of optional, required",
        ),
        (
            format!("[limits]\nidle_timeout = \"5 fortnights\"\n{}", listener("")),
            "relay.toml:2: limits.idle_timeout: invalid duration '5 fortnights', expected e.g. \"500ms\", \"10s\", \"5m\", \"1h\"",
        ),
        (
            format!("[limits]\nmax_connections = 0\n{}", listener("")),
            "relay.toml:2: limits.max_connections: must be at least 1",
        ),
        (
            format!("[dataplane]\nworkers = 0\n{}", listener("")),
            "relay.toml:2: dataplane.workers: must be between 1 and 1024",
        ),
        (GOOD_TAIL.to_string(), "relay.toml:1: listeners: no listeners configured"),
        (
            "[[listeners]\nname = \"a\"\n".to_string(),
            "relay.toml:1: (syntax): unclosed array table, expected `]`",
        ),
        (
            mail_edge("", "").replace(
                "next_hops = [\"127.0.0.1:25\"]\n",
                "next_hops = [\"127.0.0.1:25\"]\ntls.policy = \"plain\"\n\ntls.verify = \"certificate\"\n",
            ),
            "relay.toml:16: outbound_connectors[0].tls.verify: a verification level needs policy opportunistic or required, not plain",
        ),
        (
            "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:8000\"\nupstream = \"up\"\n\n[[listeners]]\nname = \"b\"\nupstream = \"up\"\naddress = \"127.0.0.1:8000\"\n".to_string() + GOOD_TAIL,
            "relay.toml:9: listeners[1].address: address 127.0.0.1:8000 is used by another listener",
        ),
        (
            listener("tls.groups = []"),
            "relay.toml:5: listeners[0].tls.groups: needs at least one key exchange group (X25519MLKEM768, X25519, secp256r1, secp384r1)",
        ),
        (
            listener("tls.groups = [\"X25519\", \"ffdhe2048\"]"),
            "relay.toml:5: listeners[0].tls.groups: unknown key exchange group 'ffdhe2048', expected one of X25519MLKEM768, X25519, secp256r1, secp384r1",
        ),
        (
            mail_edge("", "").replace(
                "next_hops = [\"127.0.0.1:25\"]\n",
                "next_hops = [\"127.0.0.1:25\"]\ndane = \"only\"\n",
            ),
            "relay.toml:14: outbound_connectors[0].dane: DANE needs next_hops = [\"mx\"]: TLSA records are looked up for MX hosts",
        ),
        (
            mail_edge("", "").replace(
                "next_hops = [\"127.0.0.1:25\"]\n",
                "next_hops = [\"127.0.0.1:25\"]\nmta_sts = true\n",
            ),
            "relay.toml:14: outbound_connectors[0].mta_sts: MTA-STS needs next_hops = [\"mx\"]: policies list a domain's MX hosts",
        ),
        (
            mail_edge("", "").replace("[\"127.0.0.1:25\"]", "[\"mx\", \"127.0.0.1:25\"]"),
            "relay.toml:13: outbound_connectors[0].next_hops: \"mx\" routes by DNS and stands alone; put fixed next hops in another connector",
        ),
        (
            mail_edge("", "").replace("[\"127.0.0.1:25\"]", "[\"mx:0\"]"),
            "relay.toml:13: outbound_connectors[0].next_hops[0]: invalid MX port in 'mx:0'",
        ),
        (
            mail_edge("", "").replace(
                "next_hops = [\"127.0.0.1:25\"]\n",
                "next_hops = [\"mx\"]\ndane = \"sometimes\"\n",
            ),
            "relay.toml:14: outbound_connectors[0].dane: unknown DANE mode 'sometimes', expected one of off, on, only",
        ),
        (
            mail_edge("", "[dns]\ntrust_anchors = \"/nonexistent/anchors.key\"\n")
                .replace("[\"127.0.0.1:25\"]", "[\"mx\"]"),
            "relay.toml:16: dns.trust_anchors: /nonexistent/anchors.key: No such file or directory (os error 2)",
        ),
        (
            listener("tls.mode = 3"),
            "relay.toml:5: listeners[0].tls.mode: invalid type: integer `3`, expected a string",
        ),
    ];
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(text, want)| {
            let got = error_of(text);
            (got != *want).then(|| format!("config:\n{text}\n  want: {want}\n  got:  {got}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn file_problems_name_the_field_and_the_file() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    let other = pki.leaf("other", &["other.test"]);
    let missing = pki.dir().join("missing.pem");
    let cases = [
        (
            format!(
                "tls.certificates = [{{ chain = {}, key = {} }}]",
                toml_path(&missing),
                toml_path(&leaf.key)
            ),
            "listeners[0].tls.certificates[0]",
            "missing.pem",
        ),
        (
            format!(
                "tls.certificates = [{{ chain = {}, key = {} }}]",
                toml_path(&leaf.chain),
                toml_path(&other.key)
            ),
            "listeners[0].tls.certificates[0]",
            "does not match the certificate",
        ),
        (
            format!(
                "tls.certificates = [{{ chain = {}, key = {} }}]",
                toml_path(&leaf.key),
                toml_path(&leaf.key)
            ),
            "listeners[0].tls.certificates[0]",
            "no certificate found",
        ),
        (
            format!(
                "tls.client_auth = {{ mode = \"required\", trust_anchors = {} }}",
                toml_path(&missing)
            ),
            "listeners[0].tls.client_auth.trust_anchors",
            "missing.pem",
        ),
    ];
    for (body, field, detail) in cases {
        let err = error_of(&listener(&body));
        assert!(
            err.starts_with(&format!("relay.toml:5: {field}: ")) && err.contains(detail),
            "got: {err}"
        );
    }
}

/// A lab may run an open relay, but only when it says so, and `check`
/// says it loudly.
#[test]
fn open_relay_is_accepted_only_when_asked_for_and_then_flagged() {
    let lab = "[[inbound_connectors]]\nname = \"lab\"\nallow_relay = true\n";
    assert!(error_of(&mail_edge("", lab)).contains("an open relay"));
    let config = Config::parse(
        &mail_edge("open_relay = true", lab),
        "relay.toml",
        std::env::temp_dir(),
    )
    .expect("allowed when asked for");
    let plan = Plan::build(&config, SelfSignedSource::Ephemeral).unwrap();
    assert!(
        plan.description.iter().any(|l| l
            .starts_with("WARNING: OPEN RELAY: connector lab lets any client relay to any domain")),
        "{:#?}",
        plan.description
    );
    // A closed edge says who may relay.
    let edge = mail_edge("", "[[inbound_connectors]]\nname = \"on-premises\"\nclient_addresses = [\"10.0.0.0/24\"]\nallow_relay = true\n");
    let config = Config::parse(&edge, "relay.toml", std::env::temp_dir()).unwrap();
    let plan = Plan::build(&config, SelfSignedSource::Ephemeral).unwrap();
    let said = plan.description.join("\n");
    assert!(said.contains("accepted domains: example.org"), "{said}");
    assert!(
        said.contains("relaying to other domains: only sessions of on-premises (from 10.0.0.0/24); everyone else gets 554 5.7.1 Relay access denied"),
        "{said}"
    );
    assert!(!said.contains("OPEN RELAY"), "{said}");
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let pki = Pki::new();
    pki.leaf("relay", &["relay.test"]);
    let text = listener("tls.certificates = [{ chain = \"relay.crt\", key = \"relay.key\" }]");
    let path = pki.dir().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    assert!(Plan::build(&config, SelfSignedSource::Ephemeral).is_ok());
}

#[test]
fn metrics_address_and_crl_files_are_checked() {
    let err = error_of(&format!(
        "[metrics]\naddress = \"port 80\"\n{}",
        listener("")
    ));
    assert!(err.starts_with("relay.toml:2: metrics.address: "), "{err}");
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    let text = format!(
        "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\n\n[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:9\"\ntls.policy = \"required\"\ntls.verify = \"certificate\"\ntls.trust_anchors = {}\ntls.crls = [{}]\n",
        toml_path(&pki.ca_pem),
        toml_path(&leaf.chain)
    );
    let err = error_of(&text);
    assert!(
        err.starts_with("relay.toml:12: upstreams[0].tls.crls: ") && err.contains("no CRL found"),
        "a certificate is not a CRL: {err}"
    );
}
