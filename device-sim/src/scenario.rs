//! Scenario files: a fleet described in TOML (device groups, their sensor models, rates and
//! fault schedules), so that a tester can play the same fleet again. Parsing and checking only;
//! [`crate::run`] plays what [`Scenario::groups`] returns.
//!
//! ```toml
//! seed = 7            # run-wide settings; flags given on the command line win
//! duration = "2m"
//! ack = true
//!
//! [[group]]
//! name = "greenhouse"
//! devices = 20        # the next 20 devices of the fleet file
//! rate = 2.0          # readings per second per device
//! batch = 8
//! faults = { loss = 0.01 }
//!
//! [[group.sensor]]
//! id = 1
//! model = "temperature"
//!
//! [[group.sensor]]
//! id = 2
//! model = "sine"
//! mean = 400
//! amplitude = 50
//! period = "10m"
//! missing = 0.01      # 1 % of samples are sent as NaN
//!
//! [[group.fault]]     # from 30 s to 45 s into the run, every transmission is lost
//! from = "30s"
//! until = "45s"
//! loss = 1.0
//!
//! [[group.fault]]     # then the devices fall silent for half a minute
//! from = "60s"
//! until = "90s"
//! silent = true
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::Faults;
use crate::model::{Kind, SensorSpec};

/// A parsed and checked scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Seed of every random choice.
    pub seed: Option<u64>,
    /// How long to send (zero: until stopped).
    pub duration: Option<Duration>,
    /// Ask for acks and retransmit.
    pub ack: Option<bool>,
    /// Retransmissions per datagram.
    pub retries: Option<u32>,
    /// Time to wait for an ack.
    pub ack_timeout: Option<Duration>,
    /// Devices per UDP socket.
    pub devices_per_socket: Option<usize>,
    /// The device groups, in fleet order.
    pub groups: Vec<DeviceGroup>,
}

/// Devices that behave alike: a slice of the fleet file, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceGroup {
    /// Name shown in the report.
    pub name: String,
    /// How many devices.
    pub devices: usize,
    /// Readings per second per device.
    pub rate: f64,
    /// Readings per datagram.
    pub batch: usize,
    /// The sensors, their models and missing-sample probabilities.
    pub sensors: Vec<SensorSpec>,
    /// Fault probabilities outside every scheduled window.
    pub faults: Faults,
    /// Fault windows, by time since the start of the run.
    pub schedule: Vec<FaultWindow>,
}

/// From `from` until `until` after the start of the run, `faults` replace the group's own; a
/// silent device sends no telemetry at all (as if switched off).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultWindow {
    /// Start, since the start of the run.
    pub from: Duration,
    /// End (exclusive).
    pub until: Duration,
    /// Fault probabilities inside the window.
    pub faults: Faults,
    /// Send nothing inside the window.
    pub silent: bool,
}

/// The faults in force `elapsed` into the run: those of the first window holding that
/// instant, else `base`. `None` when the device is silent.
pub(crate) fn faults_at<'a>(
    base: &'a Faults,
    schedule: &'a [FaultWindow],
    elapsed: Duration,
) -> Option<&'a Faults> {
    match schedule
        .iter()
        .find(|w| w.from <= elapsed && elapsed < w.until)
    {
        Some(w) if w.silent => None,
        Some(w) => Some(&w.faults),
        None => Some(base),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    seed: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    ack: Option<bool>,
    retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    ack_timeout: Option<Duration>,
    devices_per_socket: Option<usize>,
    #[serde(default)]
    group: Vec<GroupFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    name: Option<String>,
    devices: usize,
    #[serde(default = "default_rate")]
    rate: f64,
    #[serde(default = "default_batch")]
    batch: usize,
    #[serde(default)]
    faults: FaultsFile,
    /// Sensor tables, read by hand: the model's own keys sit beside `id` and `missing`.
    #[serde(default)]
    sensor: Vec<toml::Table>,
    #[serde(default)]
    fault: Vec<WindowFile>,
}

fn default_rate() -> f64 {
    10.0
}

fn default_batch() -> usize {
    16
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsFile {
    #[serde(default)]
    loss: f64,
    #[serde(default)]
    dup: f64,
    #[serde(default)]
    reorder: f64,
    #[serde(default)]
    corrupt: f64,
    #[serde(default)]
    replay: f64,
}

impl FaultsFile {
    fn check(&self) -> Result<Faults, String> {
        let faults = Faults {
            loss: self.loss,
            dup: self.dup,
            reorder: self.reorder,
            corrupt: self.corrupt,
            replay: self.replay,
        };
        faults.check()?;
        Ok(faults)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    #[serde(with = "humantime_serde")]
    from: Duration,
    #[serde(with = "humantime_serde")]
    until: Duration,
    #[serde(default)]
    silent: bool,
    #[serde(default)]
    loss: f64,
    #[serde(default)]
    dup: f64,
    #[serde(default)]
    reorder: f64,
    #[serde(default)]
    corrupt: f64,
    #[serde(default)]
    replay: f64,
}

impl WindowFile {
    fn faults(&self) -> FaultsFile {
        FaultsFile {
            loss: self.loss,
            dup: self.dup,
            reorder: self.reorder,
            corrupt: self.corrupt,
            replay: self.replay,
        }
    }
}

/// Most sensors a device can have on at once (the control protocol's sensor set).
const MAX_SENSOR_ID: u16 = 64;

impl Scenario {
    /// Reads and checks a scenario file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("scenario {}: {e}", path.display()))
    }

    /// Parses and checks scenario text.
    ///
    /// # Errors
    /// What is wrong, with the group and key it concerns.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.group.is_empty() {
            return Err("no [[group]]: a scenario describes at least one group of devices".into());
        }
        if file.devices_per_socket == Some(0) {
            return Err("devices_per_socket must be at least 1".into());
        }
        let mut groups = Vec::with_capacity(file.group.len());
        for (n, g) in file.group.into_iter().enumerate() {
            let name = g.name.clone().unwrap_or_else(|| format!("group{}", n + 1));
            let group = check_group(name.clone(), g).map_err(|e| format!("group {name:?}: {e}"))?;
            if groups.iter().any(|o: &DeviceGroup| o.name == group.name) {
                return Err(format!("two groups are named {name:?}"));
            }
            groups.push(group);
        }
        Ok(Scenario {
            seed: file.seed,
            duration: file.duration,
            ack: file.ack,
            retries: file.retries,
            ack_timeout: file.ack_timeout,
            devices_per_socket: file.devices_per_socket,
            groups,
        })
    }

    /// Devices the scenario plays, all groups together.
    pub fn devices(&self) -> usize {
        self.groups.iter().map(|g| g.devices).sum()
    }
}

fn check_group(name: String, g: GroupFile) -> Result<DeviceGroup, String> {
    if g.devices == 0 {
        return Err("devices must be at least 1".into());
    }
    if !(g.rate > 0.0 && g.rate.is_finite()) {
        return Err(format!("rate = {} must be a positive number", g.rate));
    }
    if !(1..=proto::MAX_READINGS).contains(&g.batch) {
        return Err(format!(
            "batch = {} must be within 1..={}",
            g.batch,
            proto::MAX_READINGS
        ));
    }
    let faults = g.faults.check().map_err(|e| format!("faults: {e}"))?;
    let sensors = if g.sensor.is_empty() {
        SensorSpec::classic()
    } else {
        let mut sensors: Vec<SensorSpec> = Vec::with_capacity(g.sensor.len());
        for (i, table) in g.sensor.into_iter().enumerate() {
            let s = sensor(table).map_err(|e| format!("sensor #{}: {e}", i + 1))?;
            if sensors.iter().any(|o| o.id == s.id) {
                return Err(format!("sensor {} is listed twice", s.id));
            }
            sensors.push(s);
        }
        sensors.sort_by_key(|s| s.id);
        sensors
    };
    let mut schedule = Vec::with_capacity(g.fault.len());
    for (i, w) in g.fault.into_iter().enumerate() {
        let at = |e: String| format!("fault #{}: {e}", i + 1);
        if w.from >= w.until {
            return Err(at(format!(
                "from {} is not before until {}",
                humantime::format_duration(w.from),
                humantime::format_duration(w.until)
            )));
        }
        schedule.push(FaultWindow {
            from: w.from,
            until: w.until,
            faults: w.faults().check().map_err(at)?,
            silent: w.silent,
        });
    }
    Ok(DeviceGroup {
        name,
        devices: g.devices,
        rate: g.rate,
        batch: g.batch,
        sensors,
        faults,
        schedule,
    })
}

/// One `[[group.sensor]]` table: `id`, optional `missing`, and the model with its keys.
fn sensor(mut table: toml::Table) -> Result<SensorSpec, String> {
    let id = match table.remove("id") {
        Some(toml::Value::Integer(id)) if (1..=i64::from(MAX_SENSOR_ID)).contains(&id) => id as u16,
        Some(v) => return Err(format!("id = {v} must be within 1..={MAX_SENSOR_ID}")),
        None => return Err("missing key `id`".into()),
    };
    let missing = match table.remove("missing") {
        None => 0.0,
        Some(toml::Value::Float(p)) if (0.0..=1.0).contains(&p) => p,
        Some(toml::Value::Integer(p)) if p == 0 || p == 1 => p as f64,
        Some(v) => return Err(format!("missing = {v} is not a probability (0..=1)")),
    };
    if !table.contains_key("model") {
        return Err(format!(
            "sensor {id}: missing key `model` (temperature, humidity, pressure, vibration, \
             constant, sine, random_walk or counter)"
        ));
    }
    // Integers where the model wants numbers are taken as numbers (`mean = 400`).
    for (_, v) in table.iter_mut() {
        if let toml::Value::Integer(i) = *v {
            *v = toml::Value::Float(i as f64);
        }
    }
    let keys: Vec<String> = table.keys().filter(|k| *k != "model").cloned().collect();
    let kind: Kind = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("sensor {id}: {}", e.message()))?;
    // serde lets keys beside a variant without fields pass: refuse them here.
    if let (Kind::Temperature | Kind::Humidity | Kind::Pressure | Kind::Vibration, Some(k)) =
        (&kind, keys.first())
    {
        return Err(format!(
            "sensor {id}: unknown field `{k}` (this model takes no parameters)"
        ));
    }
    kind.validate().map_err(|e| format!("sensor {id}: {e}"))?;
    Ok(SensorSpec { id, kind, missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        seed = 7
        duration = "2m"
        ack = true

        [[group]]
        name = "greenhouse"
        devices = 20
        rate = 2.0
        batch = 8
        faults = { loss = 0.01 }

        [[group.sensor]]
        id = 2
        model = "sine"
        mean = 400
        amplitude = 50
        period = "10m"
        missing = 0.01

        [[group.sensor]]
        id = 1
        model = "temperature"

        [[group.fault]]
        from = "30s"
        until = "45s"
        loss = 1.0

        [[group.fault]]
        from = "60s"
        until = "90s"
        silent = true

        [[group]]
        devices = 3
    "#;

    #[test]
    fn the_documented_example_parses() -> Result<(), String> {
        let s = Scenario::parse(EXAMPLE)?;
        assert_eq!(s.seed, Some(7));
        assert_eq!(s.duration, Some(Duration::from_secs(120)));
        assert_eq!(s.ack, Some(true));
        assert_eq!(s.devices(), 23);
        let g = &s.groups[0];
        assert_eq!(
            (g.name.as_str(), g.devices, g.rate, g.batch),
            ("greenhouse", 20, 2.0, 8)
        );
        assert_eq!(g.faults.loss, 0.01);
        // Sorted by id.
        assert_eq!(g.sensors[0].kind, Kind::Temperature);
        assert_eq!(
            g.sensors[1],
            SensorSpec {
                id: 2,
                kind: Kind::Sine {
                    mean: 400.0,
                    amplitude: 50.0,
                    period: Duration::from_secs(600),
                    noise: 0.0
                },
                missing: 0.01
            }
        );
        assert_eq!(g.schedule.len(), 2);
        assert_eq!(g.schedule[0].faults.loss, 1.0);
        assert!(g.schedule[1].silent);
        // Defaults: a name, 10 readings/s, 16 per datagram, the four classic sensors.
        let d = &s.groups[1];
        assert_eq!((d.name.as_str(), d.rate, d.batch), ("group2", 10.0, 16));
        assert_eq!(d.sensors, SensorSpec::classic());
        Ok(())
    }

    #[test]
    fn the_shipped_example_parses() -> Result<(), String> {
        let s = Scenario::parse(include_str!("../scenarios/greenhouse.toml"))?;
        assert_eq!(s.devices(), 30);
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["climate", "meters", "pumps"]);
        assert_eq!(s.groups[2].schedule.len(), 2);
        Ok(())
    }

    #[test]
    fn the_schedule_picks_the_window_in_force() -> Result<(), String> {
        let s = Scenario::parse(EXAMPLE)?;
        let g = &s.groups[0];
        let at = |s: u64| faults_at(&g.faults, &g.schedule, Duration::from_secs(s)).cloned();
        assert_eq!(at(0).map(|f| f.loss), Some(0.01));
        assert_eq!(at(30).map(|f| f.loss), Some(1.0));
        assert_eq!(at(44).map(|f| f.loss), Some(1.0));
        assert_eq!(at(45).map(|f| f.loss), Some(0.01));
        assert_eq!(at(60), None);
        assert_eq!(at(90).map(|f| f.loss), Some(0.01));
        Ok(())
    }

    #[test]
    fn mistakes_get_clear_errors() {
        let cases = [
            ("", "no [[group]]"),
            (
                "[[group]]\ndevices = 0",
                "group \"group1\": devices must be at least 1",
            ),
            (
                "[[group]]\ndevices = 1\nrate = -1.0",
                "rate = -1 must be a positive number",
            ),
            (
                "[[group]]\ndevices = 1\nbatch = 51",
                "batch = 51 must be within 1..=50",
            ),
            (
                "[[group]]\ndevices = 1\ncolour = 3",
                "unknown field `colour`",
            ),
            ("sedd = 3\n[[group]]\ndevices = 1", "unknown field `sedd`"),
            (
                "duration = \"2 fortnights\"\n[[group]]\ndevices = 1",
                "duration",
            ),
            (
                "[[group]]\ndevices = 1\nfaults = { loss = 2.0 }",
                "faults: loss = 2 is not a probability",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nmodel = \"constant\"\nvalue = 1",
                "sensor #1: missing key `id`",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 65\nmodel = \"humidity\"",
                "id = 65 must be within 1..=64",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"thermometer\"",
                "unknown variant `thermometer`",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"constant\"",
                "missing field `value`",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"constant\"\nvalue = 1\nvalu = 2",
                "unknown field `valu`",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"humidity\"\nmean = 2",
                "unknown field `mean`",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"humidity\"\nmissing = 1.5",
                "missing = 1.5 is not a probability",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 3\nmodel = \"humidity\"\n[[group.sensor]]\nid = 3\nmodel = \"pressure\"",
                "sensor 3 is listed twice",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.fault]]\nfrom = \"20s\"\nuntil = \"10s\"",
                "fault #1: from 20s is not before until 10s",
            ),
            (
                "[[group]]\ndevices = 1\n[[group.fault]]\nfrom = \"1s\"\nuntil = \"2s\"\nlos = 1.0",
                "unknown field `los`",
            ),
            (
                "[[group]]\nname = \"a\"\ndevices = 1\n[[group]]\nname = \"a\"\ndevices = 1",
                "two groups are named \"a\"",
            ),
        ];
        for (text, want) in cases {
            match Scenario::parse(text) {
                Ok(s) => panic!("accepted {text:?}: {s:?}"),
                Err(e) => assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}"),
            }
        }
    }
}
