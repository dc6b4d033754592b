//! Sensor models: deterministic signal generators (seeded), no sockets and no clock; the time
//! of each sample is passed in.
//!
//! A device carries one [`SensorModel`]: a model per sensor id. Without a scenario, a simulated
//! device has the four classic sensors:
//! 1. temperature, °C: a random walk around a daily cycle (±5 °C around 20 °C);
//! 2. relative humidity, %: a bounded random walk between 5 and 100;
//! 3. pressure, hPa: a slow random walk around 1013;
//! 4. vibration, g RMS: low noise with occasional bursts of strong shaking.
//!
//! A scenario file picks a [`Kind`] per sensor id, including generic signals (constant, sine,
//! bounded random walk, counter), and a probability that a sample is missing (sent as NaN, as a
//! device reports a failed sensor).

use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use serde::Deserialize;

/// Sensors per simulated device without a scenario.
pub const SENSORS: u16 = 4;

const DAY_MS: f64 = 86_400_000.0;

/// What a sensor measures and how its signal moves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Kind {
    /// °C: a random walk around a daily cycle (±5 °C around 20 °C).
    Temperature,
    /// %: a bounded random walk between 5 and 100.
    Humidity,
    /// hPa: a slow random walk around 1013.
    Pressure,
    /// g RMS: low noise with occasional bursts of strong shaking.
    Vibration,
    /// Always `value`.
    Constant {
        /// The value.
        value: f64,
    },
    /// `mean + amplitude · sin(2π t / period)` plus uniform noise of ± `noise`.
    Sine {
        /// Centre of the wave.
        mean: f64,
        /// Half the peak-to-peak swing.
        amplitude: f64,
        /// Length of one cycle, e.g. "1h".
        #[serde(with = "humantime_serde")]
        period: Duration,
        /// Uniform noise added to each sample, ±.
        #[serde(default)]
        noise: f64,
    },
    /// Starts at `start`, moves by up to ± `step` per sample, stays within `min..=max`.
    RandomWalk {
        /// First value.
        start: f64,
        /// Largest move per sample.
        step: f64,
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// `start`, then `start + step`, … (a meter or a pulse count).
    Counter {
        /// First value.
        #[serde(default)]
        start: f64,
        /// Increment per sample.
        step: f64,
    },
}

impl Kind {
    /// The classic model of sensor `id` (1..=4; anything else vibrates).
    pub fn classic(id: u16) -> Kind {
        match id {
            1 => Kind::Temperature,
            2 => Kind::Humidity,
            3 => Kind::Pressure,
            _ => Kind::Vibration,
        }
    }

    /// Checks the parameters; the message names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number"))
            }
        };
        match self {
            Kind::Temperature | Kind::Humidity | Kind::Pressure | Kind::Vibration => Ok(()),
            Kind::Constant { value } => finite("value", *value),
            Kind::Sine {
                mean,
                amplitude,
                period,
                noise,
            } => {
                finite("mean", *mean)?;
                finite("amplitude", *amplitude)?;
                finite("noise", *noise)?;
                if period.is_zero() {
                    return Err("period must be longer than 0".into());
                }
                if *noise < 0.0 {
                    return Err("noise must not be negative".into());
                }
                Ok(())
            }
            Kind::RandomWalk {
                start,
                step,
                min,
                max,
            } => {
                for (n, v) in [("start", start), ("step", step), ("min", min), ("max", max)] {
                    finite(n, *v)?;
                }
                if min > max {
                    return Err(format!("min {min} is above max {max}"));
                }
                if !(min..=max).contains(&start) {
                    return Err(format!("start {start} is outside {min}..={max}"));
                }
                if *step < 0.0 {
                    return Err("step must not be negative".into());
                }
                Ok(())
            }
            Kind::Counter { start, step } => {
                finite("start", *start)?;
                finite("step", *step)
            }
        }
    }
}

/// One sensor of a scenario: its id, model and how often a sample is missing.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorSpec {
    /// Sensor id, 1..=64 (the control protocol's sensor set holds 64).
    pub id: u16,
    /// Signal model.
    pub kind: Kind,
    /// Probability that a sample is missing (sent as NaN).
    pub missing: f64,
}

impl SensorSpec {
    /// The four classic sensors.
    pub fn classic() -> Vec<SensorSpec> {
        (1..=SENSORS)
            .map(|id| SensorSpec {
                id,
                kind: Kind::classic(id),
                missing: 0.0,
            })
            .collect()
    }
}

/// The moving state of one sensor.
#[derive(Debug, Clone)]
struct Sensor {
    id: u16,
    kind: Kind,
    missing: f64,
    /// Temperature offset, humidity, pressure, the walk's or the counter's current value.
    level: f64,
    /// Readings of the current vibration burst still to come, and its strength.
    burst_left: u32,
    burst_g: f64,
}

impl Sensor {
    fn new(spec: &SensorSpec, rng: &mut SmallRng) -> Self {
        let level = match &spec.kind {
            Kind::Temperature => rng.random_range(-2.0..2.0),
            Kind::Humidity => rng.random_range(30.0..70.0),
            Kind::Pressure => rng.random_range(1000.0..1025.0),
            Kind::RandomWalk { start, .. } | Kind::Counter { start, .. } => *start,
            Kind::Vibration | Kind::Constant { .. } | Kind::Sine { .. } => 0.0,
        };
        Self {
            id: spec.id,
            kind: spec.kind.clone(),
            missing: spec.missing,
            level,
            burst_left: 0,
            burst_g: 0.0,
        }
    }

    fn sample(&mut self, ts_ms: u64, rng: &mut SmallRng) -> f64 {
        let v = match &self.kind {
            Kind::Temperature => {
                self.level = (self.level + rng.random_range(-0.05..0.05)) * 0.999;
                let phase = (ts_ms as f64 % DAY_MS) / DAY_MS * std::f64::consts::TAU;
                20.0 - 5.0 * phase.cos() + self.level
            }
            Kind::Humidity => {
                self.level = (self.level + rng.random_range(-0.3..0.3)).clamp(5.0, 100.0);
                self.level
            }
            Kind::Pressure => {
                self.level += rng.random_range(-0.02..0.02) + (1013.0 - self.level) * 0.001;
                self.level
            }
            Kind::Vibration => {
                if self.burst_left == 0 && rng.random_bool(0.002) {
                    self.burst_left = rng.random_range(20..100);
                    self.burst_g = rng.random_range(0.5..3.0);
                }
                if self.burst_left > 0 {
                    self.burst_left -= 1;
                    self.burst_g * rng.random_range(0.6..1.0)
                } else {
                    rng.random_range(0.005..0.03)
                }
            }
            Kind::Constant { value } => *value,
            Kind::Sine {
                mean,
                amplitude,
                period,
                noise,
            } => {
                let p = period.as_millis().max(1) as f64;
                let phase = (ts_ms as f64 % p) / p * std::f64::consts::TAU;
                let jitter = if *noise > 0.0 {
                    rng.random_range(-*noise..=*noise)
                } else {
                    0.0
                };
                mean + amplitude * phase.sin() + jitter
            }
            Kind::RandomWalk { step, min, max, .. } => {
                if *step > 0.0 {
                    self.level = (self.level + rng.random_range(-*step..=*step)).clamp(*min, *max);
                }
                self.level
            }
            Kind::Counter { step, .. } => {
                let v = self.level;
                self.level += step;
                v
            }
        };
        // Drawn after the signal so that a missing sample does not shift the signal's course.
        if self.missing > 0.0 && rng.random_bool(self.missing) {
            return f64::NAN;
        }
        (v * 100.0).round() / 100.0
    }
}

/// The state of one device's sensors.
#[derive(Debug, Clone)]
pub struct SensorModel {
    sensors: Vec<Sensor>,
}

impl SensorModel {
    /// The four classic sensors with a random starting state.
    pub fn new(rng: &mut SmallRng) -> Self {
        Self::with_sensors(&SensorSpec::classic(), rng)
    }

    /// The given sensors with a random starting state.
    pub fn with_sensors(specs: &[SensorSpec], rng: &mut SmallRng) -> Self {
        Self {
            sensors: specs.iter().map(|s| Sensor::new(s, rng)).collect(),
        }
    }

    /// The next value of `sensor` at time `ts_ms`, rounded to 0.01 (NaN when missing). A sensor
    /// the model does not know (a control command may switch one on) gets its classic model.
    pub fn sample(&mut self, sensor: u16, ts_ms: u64, rng: &mut SmallRng) -> f64 {
        let i = match self.sensors.iter().position(|s| s.id == sensor) {
            Some(i) => i,
            None => {
                let spec = SensorSpec {
                    id: sensor,
                    kind: Kind::classic(sensor),
                    missing: 0.0,
                };
                self.sensors.push(Sensor::new(&spec, rng));
                self.sensors.len() - 1
            }
        };
        self.sensors[i].sample(ts_ms, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn deterministic_and_in_range() {
        let run = || {
            let mut rng = SmallRng::seed_from_u64(7);
            let mut m = SensorModel::new(&mut rng);
            (0..4000u64)
                .map(|i| m.sample((i % 4) as u16 + 1, 1_764_000_000_000 + i * 250, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        for (i, v) in a.iter().enumerate() {
            let ok = match i % 4 {
                0 => (5.0..35.0).contains(v),
                1 => (5.0..=100.0).contains(v),
                2 => (950.0..1080.0).contains(v),
                _ => (0.0..3.1).contains(v),
            };
            assert!(ok, "sensor {} value {v}", i % 4 + 1);
        }
    }

    fn spec(id: u16, kind: Kind, missing: f64) -> SensorSpec {
        SensorSpec { id, kind, missing }
    }

    #[test]
    fn generic_models_follow_their_parameters() {
        let specs = [
            spec(1, Kind::Constant { value: 3.3 }, 0.0),
            spec(
                2,
                Kind::Sine {
                    mean: 10.0,
                    amplitude: 2.0,
                    period: Duration::from_secs(60),
                    noise: 0.0,
                },
                0.0,
            ),
            spec(
                3,
                Kind::RandomWalk {
                    start: 50.0,
                    step: 1.0,
                    min: 45.0,
                    max: 55.0,
                },
                0.0,
            ),
            spec(
                4,
                Kind::Counter {
                    start: 100.0,
                    step: 0.5,
                },
                0.0,
            ),
            spec(5, Kind::Constant { value: 1.0 }, 0.25),
        ];
        let mut rng = SmallRng::seed_from_u64(3);
        let mut m = SensorModel::with_sensors(&specs, &mut rng);
        // A quarter of a minute-long cycle: the sine is at its peak.
        assert_eq!(m.sample(2, 15_000, &mut rng), 12.0);
        assert_eq!(m.sample(2, 45_000, &mut rng), 8.0);
        let mut missing = 0;
        for i in 0..2000u64 {
            assert_eq!(m.sample(1, i, &mut rng), 3.3);
            let w = m.sample(3, i, &mut rng);
            assert!((45.0..=55.0).contains(&w), "walk left its bounds: {w}");
            assert_eq!(m.sample(4, i, &mut rng), 100.0 + 0.5 * i as f64);
            let v = m.sample(5, i, &mut rng);
            if v.is_nan() {
                missing += 1;
            } else {
                assert_eq!(v, 1.0);
            }
        }
        // 25 % of 2,000 is 500; a fair draw stays well within 400..600.
        assert!((400..600).contains(&missing), "missing {missing}");
        // A sensor the model was not given (switched on by a command) gets its classic model.
        let p = m.sample(9, 0, &mut rng);
        assert!((0.0..3.1).contains(&p), "{p}");
    }

    #[test]
    fn bad_parameters_are_named() {
        let walk = Kind::RandomWalk {
            start: 60.0,
            step: 1.0,
            min: 0.0,
            max: 50.0,
        };
        assert_eq!(
            walk.validate().err().as_deref(),
            Some("start 60 is outside 0..=50")
        );
        let sine = Kind::Sine {
            mean: 0.0,
            amplitude: 1.0,
            period: Duration::ZERO,
            noise: 0.0,
        };
        assert_eq!(
            sine.validate().err().as_deref(),
            Some("period must be longer than 0")
        );
        assert_eq!(
            Kind::Constant { value: f64::NAN }
                .validate()
                .err()
                .as_deref(),
            Some("value must be a finite number")
        );
    }
}
