//! Secrets kept out of logs and messages: connection URLs with their
//! passwords hidden.

/// The URL with any password in it replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The userinfo ends at the last '@': a password may hold '/', '?' or '@'
    // itself, and hiding too much is better than showing a secret.
    let (userinfo, hostpath) = match rest.rfind('@') {
        Some(i) => (
            match rest[..i].split_once(':') {
                Some((user, _)) => format!("{user}:***@"),
                None => format!("{}@", &rest[..i]),
            },
            &rest[i + 1..],
        ),
        None => (String::new(), rest),
    };
    // Query parameters may carry passwords too.
    let mut out = String::with_capacity(hostpath.len());
    let mut tail = hostpath;
    while let Some(i) = tail.to_ascii_lowercase().find("password=") {
        out.push_str(&tail[..i + "password=".len()]);
        out.push_str("***");
        tail = &tail[i + "password=".len()..];
        tail = &tail[tail.find('&').unwrap_or(tail.len())..];
    }
    out.push_str(tail);
    format!("{scheme}://{userinfo}{out}")
}

/// Whether a URL carries a password in its userinfo (`user:pass@host`).
pub fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    authority
        .rsplit_once('@')
        .map(|(userinfo, _)| userinfo.contains(':'))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            redact_url("ws://root:hunter2@h:8000/x"),
            "ws://root:***@h:8000/x"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=hunter2&x=1"),
            "postgres://u@h/db?password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://app:pa/ss@db/shop"),
            "postgres://app:***@db/shop"
        );
        assert_eq!(
            redact_url("postgres://app:p?a@s@db/shop?sslmode=require"),
            "postgres://app:***@db/shop?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/shop?user=a@b&PASSWORD=x&y=1"),
            "postgres://db/shop?user=a@b&PASSWORD=***&y=1"
        );
        assert_eq!(
            redact_url("surrealkv://data/target"),
            "surrealkv://data/target"
        );
        assert!(url_has_password("postgres://a:b@h/d"));
        assert!(!url_has_password("postgres://a@h/d"));
    }
}
