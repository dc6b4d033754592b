//! Sensor models: deterministic signal generators (seeded), no sockets and no clock; the time
//! of each sample is passed in.
//!
//! A simulated device has four sensors:
//! 1. temperature, °C: a random walk around a daily cycle (±5 °C around 20 °C);
//! 2. relative humidity, %: a bounded random walk between 5 and 100;
//! 3. pressure, hPa: a slow random walk around 1013;
//! 4. vibration, g RMS: low noise with occasional bursts of strong shaking.

use rand::Rng;
use rand::rngs::SmallRng;

/// Sensors per simulated device.
pub const SENSORS: u16 = 4;

const DAY_MS: f64 = 86_400_000.0;

/// The state of one device's four sensors.
#[derive(Debug, Clone)]
pub struct SensorModel {
    temp_offset: f64,
    humidity: f64,
    pressure: f64,
    /// Readings of the current vibration burst still to come, and its strength.
    burst_left: u32,
    burst_g: f64,
}

impl SensorModel {
    /// A model with a random starting state.
    pub fn new(rng: &mut SmallRng) -> Self {
        Self {
            temp_offset: rng.random_range(-2.0..2.0),
            humidity: rng.random_range(30.0..70.0),
            pressure: rng.random_range(1000.0..1025.0),
            burst_left: 0,
            burst_g: 0.0,
        }
    }

    /// The next value of `sensor` (1..=4) at time `ts_ms`, rounded to 0.01.
    pub fn sample(&mut self, sensor: u16, ts_ms: u64, rng: &mut SmallRng) -> f64 {
        let v = match sensor {
            1 => {
                self.temp_offset = (self.temp_offset + rng.random_range(-0.05..0.05)) * 0.999;
                let phase = (ts_ms as f64 % DAY_MS) / DAY_MS * std::f64::consts::TAU;
                20.0 - 5.0 * phase.cos() + self.temp_offset
            }
            2 => {
                self.humidity = (self.humidity + rng.random_range(-0.3..0.3)).clamp(5.0, 100.0);
                self.humidity
            }
            3 => {
                self.pressure += rng.random_range(-0.02..0.02) + (1013.0 - self.pressure) * 0.001;
                self.pressure
            }
            _ => {
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
        };
        (v * 100.0).round() / 100.0
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
}
