//! Rate limiting with Firecracker's semantics, for any device that takes requests from a queue.
//!
//! A [`RateLimiter`] has up to two [`TokenBucket`]s: `bandwidth` counts bytes, `ops` counts
//! requests (or frames). A bucket refills continuously at `size / refill_time`, up to `size`;
//! a `one_time_burst` is spent first and never refills. A request consumes one op and its
//! bytes ([`RateLimiter::consume_op`]); when a bucket lacks the tokens, the limiter arms its
//! timerfd for the moment they will be there and reports itself blocked. The device then puts
//! the request back on its queue and stops; the event loop brings it back when the timerfd
//! fires ([`RateLimiter::event_handler`]). Nothing sleeps.
//!
//! A request larger than a whole bucket still goes through, once the bucket is full: it takes
//! the bucket and leaves a debt that blocks the limiter until it has refilled what was
//! overdrawn, so the rate holds over time.
//!
//! The timerfd is made with the limiter, so a limiter added or changed later (`PATCH`) needs
//! no new descriptor: the event thread only ever arms and reads it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use log::Level;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{RateLimiterConfig, TokenBucketConfig};

const NS_PER_MS: u128 = 1_000_000;
/// The longest wait the arithmetic produces (about 136 years): a bucket of one token a year
/// and a request of a terabyte cannot overflow an [`Instant`].
const MAX_WAIT: Duration = Duration::from_secs(u32::MAX as u64);
/// How long after a `PATCH` a blocked limiter's timer fires, to re-evaluate on the event
/// thread (0 would disarm the timer).
const WAKE_NOW: Duration = Duration::from_nanos(1);

/// Errors of a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The timerfd cannot be created.
    #[error("cannot create a timerfd for the rate limiter")]
    TimerCreate(#[source] io::Error),
    /// The timerfd cannot be armed.
    #[error("cannot arm the rate limiter's timerfd")]
    TimerArm(#[source] io::Error),
}

/// What a bucket says to a request for some tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were there and are taken.
    Taken,
    /// Not enough tokens: nothing is taken, and they will be there after the wait.
    Short(Duration),
    /// More tokens than a full bucket holds: the request goes through on a full bucket, and
    /// the bucket stays empty for the wait, until the overdraft is paid back.
    Overdrawn(Duration),
}

/// One token bucket; time is passed in, so the arithmetic is tested without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    /// Nanoseconds to refill the whole bucket.
    refill_ns: u128,
    /// Burst tokens left.
    one_time_burst: u64,
    /// Tokens in the bucket.
    budget: u64,
    /// The time up to which refills are counted; in the future while an overdraft is paid.
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket as `config` describes it; `None` if it limits nothing.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        config.is_enabled().then(|| Self {
            config: *config,
            refill_ns: u128::from(config.refill_time) * NS_PER_MS,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            budget: config.size,
            last_update: now,
        })
    }

    /// What the bucket was made from.
    pub fn config(&self) -> &TokenBucketConfig {
        &self.config
    }

    /// Tokens in the bucket now (the burst not counted).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Burst tokens left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Whole tokens refilled in `ns` nanoseconds.
    fn tokens_in(&self, ns: u128) -> u128 {
        ns.saturating_mul(u128::from(self.config.size)) / self.refill_ns
    }

    /// Nanoseconds to refill `tokens`, rounded up.
    fn time_for(&self, tokens: u128) -> u128 {
        let size = u128::from(self.config.size);
        tokens.saturating_mul(self.refill_ns).div_ceil(size)
    }

    /// Adds what was refilled since the last update. The time of a token not yet whole is
    /// carried over, so frequent calls lose nothing to rounding.
    fn replenish(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last_update) else {
            return; // an overdraft is still being paid
        };
        let tokens = self.tokens_in(elapsed.as_nanos());
        let room = u128::from(self.config.size - self.budget);
        if tokens >= room {
            self.budget = self.config.size;
            self.last_update = now;
        } else {
            // tokens < room <= size, so it fits.
            self.budget += u64::try_from(tokens).unwrap_or(0);
            self.last_update += nanos(self.time_for(tokens));
        }
    }

    /// Takes `tokens` if the burst and the bucket hold them (see [`Reduction`]). Nothing
    /// changes unless the request goes through.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return Reduction::Taken;
        }
        self.replenish(now);
        let rest = tokens - self.one_time_burst;
        let size = self.config.size;
        if rest <= self.budget {
            self.one_time_burst = 0;
            self.budget -= rest;
            return Reduction::Taken;
        }
        if rest > size && self.budget == size {
            self.one_time_burst = 0;
            self.budget = 0;
            let wait = nanos(self.time_for(u128::from(rest - size)));
            self.last_update = now + wait;
            return Reduction::Overdrawn(wait);
        }
        // Until the bucket holds the request, or is full for one larger than the bucket.
        let missing = u128::from(rest.min(size) - self.budget);
        let ready = self.last_update + nanos(self.time_for(missing));
        Reduction::Short(ready.saturating_duration_since(now).max(WAKE_NOW))
    }

    /// Gives back `tokens` (to undo a consumption): to the burst while one is left, else to
    /// the bucket, never past what it holds when full.
    pub fn force_replenish(&mut self, tokens: u64) {
        let burst = self.config.one_time_burst.unwrap_or(0);
        if self.one_time_burst > 0 {
            self.one_time_burst = self.one_time_burst.saturating_add(tokens).min(burst);
        } else {
            self.budget = self.budget.saturating_add(tokens).min(self.config.size);
        }
    }
}

/// A wait in nanoseconds as a [`Duration`], at most [`MAX_WAIT`].
fn nanos(ns: u128) -> Duration {
    u64::try_from(ns)
        .map_or(MAX_WAIT, Duration::from_nanos)
        .min(MAX_WAIT)
}

/// The kind of tokens a request consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes, from the bandwidth bucket.
    Bytes,
    /// Operations, from the ops bucket.
    Ops,
}

/// A change to one bucket of a live limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is.
    None,
    /// Remove the bucket: no limit of that kind.
    Disabled,
    /// Replace the bucket with a full one of this shape.
    Update(TokenBucketConfig),
}

impl BucketUpdate {
    /// The update a `PATCH` body's bucket asks for: none when absent, a removal when it
    /// limits nothing.
    pub fn from_patch(bucket: Option<&TokenBucketConfig>) -> Self {
        match bucket {
            None => Self::None,
            Some(b) if !b.is_enabled() => Self::Disabled,
            Some(b) => Self::Update(*b),
        }
    }
}

/// A monotonic timerfd, close-on-exec and non-blocking (a read after a spurious wake-up
/// returns EAGAIN rather than waiting), for a device's timers on the event thread.
pub(crate) fn nonblocking_timerfd() -> io::Result<TimerFd> {
    // SAFETY: timerfd_create takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd just created and owned by nobody else.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

/// A bandwidth and an ops bucket with the timerfd that ends a throttle; see the module
/// documentation. Register the limiter's descriptor ([`AsRawFd`]) with the event loop for
/// reading and call [`RateLimiter::event_handler`] when it is readable.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// A consumption failed (or overdrew) and the timer is armed: nothing goes through until
    /// it fires.
    blocked: bool,
}

impl RateLimiter {
    /// A limiter that limits nothing, until [`RateLimiter::update_buckets`].
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        let timer = nonblocking_timerfd().map_err(RateLimiterError::TimerCreate)?;
        Ok(Self {
            bandwidth: None,
            ops: None,
            timer,
            blocked: false,
        })
    }

    /// A limiter as `config` describes it, its buckets full.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let mut limiter = Self::unlimited()?;
        let now = Instant::now();
        limiter.bandwidth = config.bandwidth.and_then(|b| TokenBucket::new(&b, now));
        limiter.ops = config.ops.and_then(|b| TokenBucket::new(&b, now));
        Ok(limiter)
    }

    /// The limiter's shape, as an API `GET` shows it.
    pub fn config(&self) -> Option<RateLimiterConfig> {
        RateLimiterConfig {
            bandwidth: self.bandwidth.map(|b| b.config),
            ops: self.ops.map(|b| b.config),
        }
        .normalized()
    }

    /// The bandwidth bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The ops bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// Whether a throttle is in effect: nothing goes through until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    fn bucket(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Takes `tokens` of `kind`; false when the request must wait (the limiter is then
    /// blocked and its timer armed). Always true for a kind without a bucket.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        // An unlimited kind does not read the clock.
        if self.blocked || self.bucket(kind).is_none() {
            return !self.blocked;
        }
        self.consume_at(tokens, kind, Instant::now())
    }

    /// [`RateLimiter::consume`] at time `now`.
    pub fn consume_at(&mut self, tokens: u64, kind: TokenType, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let Some(bucket) = self.bucket(kind) else {
            return true;
        };
        match bucket.reduce(tokens, now) {
            Reduction::Taken => true,
            Reduction::Short(wait) => !self.block_for(wait),
            Reduction::Overdrawn(wait) => {
                self.block_for(wait);
                true
            }
        }
    }

    /// One request of `bytes` bytes: an op and its bytes, or neither. False when the
    /// request must wait (the limiter is then blocked and its timer armed).
    pub fn consume_op(&mut self, bytes: u64) -> bool {
        // An unlimited device's requests do not read the clock.
        if self.blocked || (self.bandwidth.is_none() && self.ops.is_none()) {
            return !self.blocked;
        }
        self.consume_op_at(bytes, Instant::now())
    }

    /// [`RateLimiter::consume_op`] at time `now`.
    pub fn consume_op_at(&mut self, bytes: u64, now: Instant) -> bool {
        let ops_before = self.ops;
        if !self.consume_at(1, TokenType::Ops, now) {
            return false;
        }
        if !self.consume_at(bytes, TokenType::Bytes, now) {
            // The op is given back exactly as it was taken.
            self.ops = ops_before;
            return false;
        }
        true
    }

    /// Gives back `tokens` of `kind`, as Firecracker's `manual_replenish` (see
    /// [`TokenBucket::force_replenish`]).
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(bucket) = self.bucket(kind) {
            bucket.force_replenish(tokens);
        }
    }

    /// Arms the timer and blocks; returns whether it did. A timer that cannot be armed would
    /// never unblock the limiter, so the request then goes through unthrottled.
    fn block_for(&mut self, wait: Duration) -> bool {
        match self.timer.reset(wait, None) {
            Ok(()) => {
                self.blocked = true;
                true
            }
            Err(e) => {
                crate::guest_log!(Level::Warn, "rate limiter: cannot arm its timer: {e}");
                false
            }
        }
    }

    /// Handles a readable timerfd: the throttle ends. Returns whether the timer had fired;
    /// false for a spurious wake-up, which changes nothing.
    pub fn event_handler(&mut self) -> bool {
        match self.timer.wait() {
            Ok(n) if n > 0 => {
                self.blocked = false;
                true
            }
            _ => false,
        }
    }

    /// Changes the buckets (new ones start full, as in Firecracker). A throttled limiter's
    /// timer is made to fire at once, so the device re-evaluates its queue on its own thread
    /// under the new limits.
    pub fn update_buckets(
        &mut self,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Result<(), RateLimiterError> {
        let now = Instant::now();
        let apply = |bucket: &mut Option<TokenBucket>, update| match update {
            BucketUpdate::None => {}
            BucketUpdate::Disabled => *bucket = None,
            BucketUpdate::Update(config) => *bucket = TokenBucket::new(&config, now),
        };
        apply(&mut self.bandwidth, bandwidth);
        apply(&mut self.ops, ops);
        if self.blocked && (bandwidth, ops) != (BucketUpdate::None, BucketUpdate::None) {
            self.timer
                .reset(WAKE_NOW, None)
                .map_err(|e| RateLimiterError::TimerArm(e.into()))?;
        }
        Ok(())
    }

    /// Applies a `PATCH` body's limiter (see [`RateLimiterConfig::patch`]).
    pub fn patch(&mut self, update: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        self.update_buckets(
            BucketUpdate::from_patch(update.bandwidth.as_ref()),
            BucketUpdate::from_patch(update.ops.as_ref()),
        )
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd, readable when a throttle ends.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: (burst > 0).then_some(burst),
            refill_time: refill_ms,
        }
    }

    #[test]
    fn disabled_buckets_limit_nothing() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(&bucket(0, 5, 100), t0).is_none());
        assert!(TokenBucket::new(&bucket(5, 0, 0), t0).is_none());
        let mut l = RateLimiter::unlimited().unwrap();
        assert!(l.consume_op_at(u64::MAX, t0));
        assert_eq!(l.config(), None);
    }

    /// 1000 tokens per 100 ms, so one per 100 µs: the wait names exactly the moment the
    /// tokens are there, and partial tokens carry over between refills.
    #[test]
    fn the_bucket_refills_continuously_and_says_when_it_will_do() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 0, 100), t0).unwrap();
        assert_eq!(b.reduce(1000, t0), Reduction::Taken);
        assert_eq!(
            b.reduce(1, t0),
            Reduction::Short(Duration::from_micros(100))
        );
        assert_eq!(b.reduce(500, t0), Reduction::Short(50 * MS));
        // 150 µs: one token and a half; the half is not lost.
        assert_eq!(
            b.reduce(2, t0 + Duration::from_micros(150)),
            Reduction::Short(Duration::from_micros(50))
        );
        assert_eq!(b.budget(), 1);
        assert_eq!(
            b.reduce(2, t0 + Duration::from_micros(200)),
            Reduction::Taken
        );
        assert_eq!(b.budget(), 0);
        // Never past full, however long it waits.
        assert_eq!(b.reduce(1, t0 + 10 * 1000 * MS), Reduction::Taken);
        assert_eq!(b.budget(), 999);
    }

    #[test]
    fn the_one_time_burst_goes_first_and_never_returns() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 50, 1000), t0).unwrap();
        assert_eq!(b.reduce(40, t0), Reduction::Taken);
        assert_eq!((b.one_time_burst(), b.budget()), (10, 100));
        // 10 from the burst and 60 from the bucket.
        assert_eq!(b.reduce(70, t0), Reduction::Taken);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 40));
        assert_eq!(b.reduce(100, t0 + 1000 * MS), Reduction::Taken);
        assert_eq!(b.one_time_burst(), 0);
        // 50 from the burst and 50 from the bucket.
        let mut b = TokenBucket::new(&bucket(100, 50, 1000), t0).unwrap();
        assert_eq!(b.reduce(100, t0), Reduction::Taken);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        // A request that fails takes nothing.
        let mut b = TokenBucket::new(&bucket(100, 50, 1000), t0).unwrap();
        assert_eq!(b.reduce(60, t0), Reduction::Taken);
        assert_eq!(b.reduce(60, t0), Reduction::Taken);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
        assert_eq!(b.reduce(60, t0), Reduction::Short(300 * MS));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
    }

    /// A request larger than the bucket waits for a full bucket, then goes through and leaves
    /// the bucket empty for as long as the excess takes to refill.
    #[test]
    fn a_request_larger_than_the_bucket_goes_through_on_a_full_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 0, 1000), t0).unwrap();
        assert_eq!(b.reduce(100, t0), Reduction::Taken);
        assert_eq!(b.reduce(2500, t0), Reduction::Short(100 * MS));
        let t1 = t0 + 100 * MS;
        assert_eq!(b.reduce(2500, t1), Reduction::Overdrawn(1500 * MS));
        assert_eq!(b.budget(), 0);
        // Nothing refills while the overdraft is paid, then the bucket fills as usual.
        assert_eq!(b.reduce(1, t1 + 1400 * MS), Reduction::Short(100 * MS + MS));
        assert_eq!(b.reduce(500, t1 + 2000 * MS), Reduction::Taken);
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn waits_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1, 0, u64::MAX), t0).unwrap();
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Overdrawn(MAX_WAIT));
        let mut b = TokenBucket::new(&bucket(u64::MAX, 0, 1), t0).unwrap();
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Taken);
        assert_eq!(b.reduce(u64::MAX, t0 + 10 * MS), Reduction::Taken);
    }

    #[test]
    fn manual_replenish_undoes_a_consumption() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(2, 2, 1000)),
        })
        .unwrap();
        assert!(l.consume_at(1, TokenType::Ops, t0));
        l.manual_replenish(1, TokenType::Ops);
        assert_eq!(l.ops().unwrap().one_time_burst(), 2);
        assert!(l.consume_at(3, TokenType::Ops, t0));
        l.manual_replenish(5, TokenType::Ops);
        assert_eq!(l.ops().unwrap().budget(), 2, "never past full");
        l.manual_replenish(5, TokenType::Bytes); // no bucket: nothing to do
    }

    /// An op whose bytes must wait takes no op either; the limiter blocks until its timer
    /// fires, which the descriptor shows, and then lets the request through.
    #[test]
    fn a_throttled_request_blocks_until_the_timer_fires() {
        let mut l = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(bucket(1000, 0, 1000)),
            ops: Some(bucket(10, 0, 3_600_000)),
        })
        .unwrap();
        let t0 = Instant::now();
        assert!(l.consume_op_at(600, t0));
        assert!(!l.consume_op_at(600, t0));
        assert!(l.is_blocked());
        assert_eq!(l.ops().unwrap().budget(), 9, "the op was given back");
        assert!(!l.consume_op_at(1, t0), "blocked: nothing goes through");
        assert!(!l.event_handler(), "not yet fired");
        // 200 bytes are missing: 200 ms.
        assert!(readable_within(&l, 5000));
        assert!(l.event_handler());
        assert!(!l.is_blocked());
        assert!(l.consume_op(600));
        assert_eq!(l.ops().unwrap().budget(), 8);
    }

    /// A `PATCH` replaces or removes only the buckets it names, with full ones, and a blocked
    /// limiter's timer fires at once so its device re-evaluates.
    #[test]
    fn updates_change_the_named_buckets_and_wake_a_blocked_limiter() {
        let slow = bucket(100, 0, 1000 * 1000);
        let mut l = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(slow),
            ops: Some(bucket(1, 0, 1000 * 1000)),
        })
        .unwrap();
        assert!(l.consume_op(100));
        assert!(!l.consume_op(100));
        assert!(l.is_blocked());
        let faster = bucket(1000, 0, 1000);
        l.patch(&RateLimiterConfig {
            bandwidth: Some(faster),
            ops: None,
        })
        .unwrap();
        assert_eq!(l.bandwidth().unwrap().config(), &faster);
        assert_eq!(l.bandwidth().unwrap().budget(), 1000, "starts full");
        assert_eq!(l.ops().unwrap().config().size, 1, "not named: unchanged");
        assert!(readable_within(&l, 1000), "woken at once");
        assert!(l.event_handler());
        // The ops bucket still holds the old limit.
        assert!(!l.consume_op(100));
        l.update_buckets(BucketUpdate::None, BucketUpdate::Disabled)
            .unwrap();
        assert_eq!(
            l.config(),
            Some(RateLimiterConfig {
                bandwidth: Some(faster),
                ops: None
            })
        );
        assert!(readable_within(&l, 1000));
        assert!(l.event_handler());
        assert!(l.consume_op(100));
        // A full bucket again (not blocked: no wake-up), then overdrawn for about 136 years;
        // an update of nothing leaves it so.
        l.update_buckets(BucketUpdate::Update(faster), BucketUpdate::None)
            .unwrap();
        assert!(!readable_within(&l, 0));
        assert!(l.consume_op(u64::MAX));
        assert!(l.is_blocked());
        l.update_buckets(BucketUpdate::None, BucketUpdate::None)
            .unwrap();
        assert!(!readable_within(&l, 50));
    }

    /// Whether the limiter's timerfd becomes readable within `ms` milliseconds.
    fn readable_within(l: &RateLimiter, ms: i32) -> bool {
        let mut fd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, ms) == 1 }
    }
}

/// Serde for a limiter's shape in a snapshot's state (`#[serde(with = ...)]` on an
/// `Option<RateLimiterConfig>`): every field written, always. The API's JSON form leaves out
/// what is not set, which bincode (the state file's encoding, not self-describing) cannot read
/// back.
pub mod saved_shape {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::config::{RateLimiterConfig, TokenBucketConfig};

    /// A bucket: size, one-time burst, refill time.
    type Bucket = Option<(u64, Option<u64>, u64)>;

    fn plain(b: Option<TokenBucketConfig>) -> Bucket {
        b.map(|b| (b.size, b.one_time_burst, b.refill_time))
    }

    fn bucket(b: Bucket) -> Option<TokenBucketConfig> {
        b.map(|(size, one_time_burst, refill_time)| TokenBucketConfig {
            size,
            one_time_burst,
            refill_time,
        })
    }

    /// Writes `limiter` as (bandwidth, ops), each bucket a plain triple.
    pub fn serialize<S: Serializer>(
        limiter: &Option<RateLimiterConfig>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        limiter
            .map(|l| (plain(l.bandwidth), plain(l.ops)))
            .serialize(s)
    }

    /// Reads what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<RateLimiterConfig>, D::Error> {
        let shape: Option<(Bucket, Bucket)> = Deserialize::deserialize(d)?;
        Ok(shape.map(|(bandwidth, ops)| RateLimiterConfig {
            bandwidth: bucket(bandwidth),
            ops: bucket(ops),
        }))
    }
}
