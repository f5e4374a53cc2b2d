//! The `Authorization` header of a client request: HTTP Basic (RFC 7617) or a bearer
//! token (RFC 6750).

use axum::http::HeaderValue;
use base64::Engine as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { user: String, password: String },
    Bearer(String),
}

impl Credentials {
    /// `Err` says what is wrong with the header, for the 401 answer.
    pub fn parse(value: &HeaderValue) -> Result<Credentials, String> {
        let text = value
            .to_str()
            .map_err(|_| "is not ASCII text".to_string())?;
        let (scheme, rest) = text
            .split_once(' ')
            .ok_or_else(|| "has no scheme".to_string())?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| "has Basic credentials that are not base64".to_string())?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| "has Basic credentials that are not UTF-8".to_string())?;
            let (user, password) = decoded.split_once(':').ok_or_else(|| {
                "has Basic credentials without `:` between user and password".to_string()
            })?;
            Ok(Credentials::Basic {
                user: user.to_string(),
                password: password.to_string(),
            })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if rest.is_empty() {
                return Err("has an empty bearer token".to_string());
            }
            Ok(Credentials::Bearer(rest.to_string()))
        } else {
            Err(format!(
                "uses the scheme `{scheme}`, which this API does not take"
            ))
        }
    }

    /// ClickHouse's `X-ClickHouse-User` and `X-ClickHouse-Key` headers (the key may be
    /// absent: an empty password).
    pub fn clickhouse(
        user: &HeaderValue,
        key: Option<&HeaderValue>,
    ) -> Result<Credentials, String> {
        let text = |v: &HeaderValue, name: &str| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| format!("X-ClickHouse-{name} is not ASCII text"))
        };
        Ok(Credentials::Basic {
            user: text(user, "User")?,
            password: key.map(|k| text(k, "Key")).transpose()?.unwrap_or_default(),
        })
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Credentials::Basic { .. } => "Basic",
            Credentials::Bearer(_) => "Bearer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_and_bearer_parse_and_anything_else_says_why_not() {
        let v = HeaderValue::from_static("Basic dXNlcjpwYTpzcw==");
        assert_eq!(
            Credentials::parse(&v),
            Ok(Credentials::Basic {
                user: "user".into(),
                password: "pa:ss".into()
            })
        );
        let v = HeaderValue::from_static("Bearer abc.def");
        assert_eq!(
            Credentials::parse(&v),
            Ok(Credentials::Bearer("abc.def".into()))
        );
        let v = HeaderValue::from_static("Digest x=1");
        assert!(
            Credentials::parse(&v)
                .expect_err("digest")
                .contains("`Digest`")
        );
        let v = HeaderValue::from_static("Basic !!!");
        assert!(
            Credentials::parse(&v)
                .expect_err("bad b64")
                .contains("base64")
        );
    }
}
