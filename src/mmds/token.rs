//! MMDS V2 session tokens: 32 random bytes from the host's getrandom, written as 64 hex digits,
//! valid until their time to live (1 s to 6 h) runs out on the monotonic clock.
//!
//! Firecracker seals each token's expiry with AES-GCM under a key of the process and keeps no
//! table; Skiff has no cipher at hand and keeps the tokens it issued instead, in a bounded
//! table: at most [`MAX_TOKENS`] live ones, the one closest to expiry giving way to a new one.
//! A guest asking for tokens in a loop only shortens the life of its own older tokens. Either
//! way a token is worthless outside this process: a restored snapshot starts with none.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Shortest time to live, in seconds.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest time to live, in seconds (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;
/// Tokens kept at once.
pub const MAX_TOKENS: usize = 1024;
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// Why no token was made, with Firecracker's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The time to live is out of range.
    #[error("Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}.")]
    InvalidTtlValue(u32),
    /// The host's random source failed.
    #[error("Failed to generate a key")]
    KeyGeneration,
}

/// The tokens issued, each with its expiry and issue number (the older of two tokens expiring
/// together gives way first).
#[derive(Debug, Default)]
pub(crate) struct TokenAuthority {
    tokens: HashMap<String, (Instant, u64)>,
    issued: u64,
}

impl TokenAuthority {
    /// A new token valid for `ttl_seconds` from `now`.
    pub(crate) fn generate(
        &mut self,
        ttl_seconds: u32,
        now: Instant,
    ) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtlValue(ttl_seconds));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        crate::devices::virtio::rng::host_random(&mut bytes)
            .map_err(|_| TokenError::KeyGeneration)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, (expiry, _)| *expiry > now);
        }
        if self.tokens.len() >= MAX_TOKENS {
            let soonest = (self.tokens.iter())
                .min_by_key(|(_, order)| **order)
                .map(|(t, _)| t.clone());
            if let Some(t) = soonest {
                self.tokens.remove(&t);
            }
        }
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.issued += 1;
        self.tokens.insert(token.clone(), (expiry, self.issued));
        Ok(token)
    }

    /// Whether `token` was issued here and is still valid at `now`.
    pub(crate) fn is_valid(&self, token: &str, now: Instant) -> bool {
        token.len() == 2 * TOKEN_BYTES && self.tokens.get(token).is_some_and(|&(e, _)| e > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_live_their_time_and_no_longer() {
        let mut ta = TokenAuthority::default();
        let now = Instant::now();
        let t = ta.generate(60, now).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(ta.is_valid(&t, now));
        assert!(ta.is_valid(&t, now + Duration::from_secs(59)));
        assert!(!ta.is_valid(&t, now + Duration::from_secs(60)));
        assert!(!ta.is_valid("INVALID_TOKEN", now));
        assert!(!ta.is_valid(&t.to_uppercase(), now));
        assert_ne!(ta.generate(60, now).unwrap(), t, "random");
    }

    #[test]
    fn ttl_bounds_have_firecrackers_message() {
        let mut ta = TokenAuthority::default();
        let now = Instant::now();
        for bad in [0, 21_601, u32::MAX] {
            assert_eq!(ta.generate(bad, now), Err(TokenError::InvalidTtlValue(bad)));
        }
        assert_eq!(
            TokenError::InvalidTtlValue(0).to_string(),
            "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600."
        );
        assert!(ta.generate(1, now).is_ok() && ta.generate(21_600, now).is_ok());
    }

    /// A guest asking for tokens without end keeps the table at its bound; the newest tokens
    /// stay valid, the one nearest its expiry went first.
    #[test]
    fn the_table_is_bounded() {
        let mut ta = TokenAuthority::default();
        let now = Instant::now();
        let short = ta.generate(1, now).unwrap();
        let long: Vec<String> = (0..MAX_TOKENS + 10)
            .map(|_| ta.generate(3600, now).unwrap())
            .collect();
        assert_eq!(ta.tokens.len(), MAX_TOKENS);
        assert!(!ta.is_valid(&short, now));
        assert!(long.iter().rev().take(100).all(|t| ta.is_valid(t, now)));
    }
}
