//! Kernel time for last-seen stamps: the current jiffies read through the pinned clock program
//! and HZ measured, so that stamps can be turned into wall-clock time.
//!
//! The counting program stamps packets with `jiffies` (inlined by the verifier: ~1 ns, where
//! the clock-reading helpers cost ~25 ns per packet). To turn jiffies into wall-clock time,
//! userspace runs the `tunmeter_clock` program (pinned at `<pin_dir>/clock`) through
//! BPF_PROG_TEST_RUN to read the current jiffies, and measures HZ from two readings.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions};

use super::loader::{Instance, PROG_CLOCK};
use crate::time::unix_ms;

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("clock program at {path}: {source}")]
    Program { path: PathBuf, source: ProgramError },
    #[error("pinning the clock program at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("clock program returned {0} instead of a reading")]
    BadReading(u32),
}

/// HZ values Linux is built with.
const KNOWN_HZ: [u32; 9] = [24, 48, 64, 100, 128, 250, 256, 300, 1000];
/// Time between the two readings that measure HZ.
const HZ_WINDOW: Duration = Duration::from_millis(100);

pub fn clock_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join("clock")
}

/// Pin `inst`'s clock program, replacing a pin left by an earlier run.
pub fn pin(inst: &mut Instance, pin_dir: &Path) -> Result<(), ClockError> {
    let path = clock_pin(pin_dir);
    let _ = std::fs::remove_file(&path);
    inst.program_mut(PROG_CLOCK).pin(&path).map_err(|e| ClockError::Pin { path, reason: format!("{e:?}") })
}

/// The nearest known HZ, or the measured value when none is within 10%.
pub fn snap_hz(measured: f64) -> u32 {
    let best = KNOWN_HZ
        .iter()
        .copied()
        .min_by(|a, b| (*a as f64 - measured).abs().total_cmp(&(*b as f64 - measured).abs()))
        .unwrap_or(100);
    if (best as f64 - measured).abs() <= best as f64 * 0.1 { best } else { measured.round().max(1.0) as u32 }
}

/// A reading of the kernel clock and the wall clock at the same moment, plus HZ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    pub jiffies: u64,
    pub unix_ms: u64,
    pub hz: u32,
}

impl Calibration {
    /// Wall-clock milliseconds of a jiffies stamp (0 = never seen).
    pub fn to_unix_ms(&self, stamp: u64) -> Option<u64> {
        if stamp == 0 {
            return None;
        }
        let ago_ms = self.jiffies.saturating_sub(stamp).saturating_mul(1000) / self.hz.max(1) as u64;
        Some(self.unix_ms.saturating_sub(ago_ms))
    }
}

pub struct KernelClock {
    prog: SchedClassifier,
    path: PathBuf,
}

impl KernelClock {
    pub fn open(pin_dir: &Path) -> Result<KernelClock, ClockError> {
        let path = clock_pin(pin_dir);
        let prog =
            SchedClassifier::from_pin(&path).map_err(|source| ClockError::Program { path: path.clone(), source })?;
        Ok(KernelClock { prog, path })
    }

    /// The kernel's jiffies now.
    pub fn jiffies(&self) -> Result<u64, ClockError> {
        let input = [0u8; 64];
        let mut out = [0u8; 64];
        let r = self
            .prog
            .test_run(TestRunOptions { data_in: Some(&input), data_out: Some(&mut out), ..TestRunOptions::new() })
            .map_err(|source| ClockError::Program { path: self.path.clone(), source })?;
        if r.return_value != 0 {
            return Err(ClockError::BadReading(r.return_value));
        }
        Ok(u64::from_ne_bytes(out[..8].try_into().expect("8 bytes")))
    }

    /// Measure HZ (takes ~100 ms) and take a reading.
    pub fn calibrate(&self) -> Result<Calibration, ClockError> {
        let (j0, t0) = (self.jiffies()?, Instant::now());
        std::thread::sleep(HZ_WINDOW);
        let (j1, t1) = (self.jiffies()?, Instant::now());
        let hz = snap_hz(j1.saturating_sub(j0) as f64 / (t1 - t0).as_secs_f64());
        Ok(Calibration { jiffies: j1, unix_ms: unix_ms(), hz })
    }

    /// A new reading with an already measured HZ.
    pub fn recalibrate(&self, hz: u32) -> Result<Calibration, ClockError> {
        Ok(Calibration { jiffies: self.jiffies()?, unix_ms: unix_ms(), hz })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_snaps_to_known_values() {
        assert_eq!(snap_hz(247.0), 250);
        assert_eq!(snap_hz(262.0), 256);
        assert_eq!(snap_hz(291.0), 300);
        assert_eq!(snap_hz(99.0), 100);
        assert_eq!(snap_hz(985.0), 1000);
        assert_eq!(snap_hz(600.0), 600);
    }

    #[test]
    fn stamps_convert_to_wall_clock() {
        let c = Calibration { jiffies: 10_000, unix_ms: 1_000_000, hz: 250 };
        assert_eq!(c.to_unix_ms(0), None);
        assert_eq!(c.to_unix_ms(10_000), Some(1_000_000));
        assert_eq!(c.to_unix_ms(9_750), Some(999_000));
    }
}
