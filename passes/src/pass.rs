//! The pass manager: named passes run in order, the graph verified after each (always in
//! debug builds and tests — Cranelift's discipline, STYLE.md), and dumps taken after the
//! passes the user names (`qplc compile --dump-after PASS --format dot|svg|json|text`).
//! Passes do no I/O (DESIGN "Workspace"): dumps come back as text for the CLI to write.
use crate::memory::MemoryOptions;
use crate::partition::partition;
use crate::schedule::schedule;
use anyhow::{bail, Context};
use qplc_compiler::dump::{render, DumpFormat, DumpView};
use qplc_compiler::{Graph, Partition, StagePlan};

/// The pseudo-pass name that dumps the graph as built, before any pass.
pub const BUILD: &str = "build";

/// Settings the passes read and the analysis results they leave behind.
#[derive(Clone, Debug)]
pub struct PassContext {
    /// The static sequence length the graph was built for.
    pub seq_len: usize,
    /// `pipeline_stages` (spec §3.4).
    pub pipeline_stages: usize,
    /// `partition_method` (spec §5.6).
    pub partition_method: String,
    /// The model's decoder layer count; `None` infers it from the graph.
    pub num_layers: Option<usize>,
    pub memory: MemoryOptions,
    /// Left by the `partition` pass.
    pub partition: Option<Partition>,
    /// Left by the `schedule` pass.
    pub stages: Option<Vec<StagePlan>>,
    /// Remarks any pass wants in the report.
    pub notes: Vec<String>,
    /// Left by the `recompute` pass with `activation_offload`: kept values planned in host
    /// memory between their forward and backward use (spec §5.5).
    pub offloaded: std::collections::BTreeSet<qplc_compiler::NodeId>,
}

impl PassContext {
    pub fn new(seq_len: usize, pipeline_stages: usize, partition_method: &str) -> Self {
        PassContext {
            seq_len,
            pipeline_stages,
            partition_method: partition_method.to_string(),
            num_layers: None,
            memory: MemoryOptions::default(),
            partition: None,
            stages: None,
            notes: Vec::new(),
            offloaded: Default::default(),
        }
    }
}

/// A named graph-to-graph step.
pub trait Pass {
    /// The name `--dump-after` uses; lower-case, unique in a manager.
    fn name(&self) -> &str;
    fn run(&self, graph: Graph, cx: &mut PassContext) -> anyhow::Result<Graph>;
}

/// Splits the layer list across stages (spec §5.6); must run after the last rewrite,
/// because it records the stage of every node.
pub struct PartitionPass;

impl Pass for PartitionPass {
    fn name(&self) -> &str {
        "partition"
    }
    fn run(&self, graph: Graph, cx: &mut PassContext) -> anyhow::Result<Graph> {
        cx.partition = Some(partition(
            &graph,
            &cx.partition_method,
            cx.pipeline_stages,
            cx.num_layers,
        )?);
        cx.stages = None;
        Ok(graph)
    }
}

/// Orders each stage's ops and plans its activation arena.
pub struct SchedulePass;

impl Pass for SchedulePass {
    fn name(&self) -> &str {
        "schedule"
    }
    fn run(&self, graph: Graph, cx: &mut PassContext) -> anyhow::Result<Graph> {
        let p = cx
            .partition
            .as_ref()
            .context("the `schedule` pass needs the `partition` pass before it")?;
        cx.stages = Some(schedule(&graph, p, &cx.memory)?);
        Ok(graph)
    }
}

/// One requested dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassDump {
    /// The pass it was taken after (`build` for the input graph).
    pub pass: String,
    pub format: DumpFormat,
    pub view: DumpView,
    pub text: String,
}

impl PassDump {
    /// A file name for it: `after-partition.dot`, `after-build.collapsed.svg`.
    pub fn file_name(&self) -> String {
        let view = match self.view {
            DumpView::Full => "",
            DumpView::Collapsed => ".collapsed",
        };
        format!("after-{}{view}.{}", self.pass, self.format.extension())
    }
}

pub struct PassRun {
    pub graph: Graph,
    pub dumps: Vec<PassDump>,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    verify: bool,
    dumps: Vec<(String, DumpFormat, DumpView)>,
}

impl Default for PassManager {
    fn default() -> Self {
        Self::new()
    }
}

impl PassManager {
    /// No passes; verification on in debug builds.
    pub fn new() -> Self {
        PassManager {
            passes: Vec::new(),
            verify: cfg!(debug_assertions),
            dumps: Vec::new(),
        }
    }

    /// The passes that exist today, in pipeline order: partition, schedule. Rewrites
    /// (adapters, quantise, loss, autodiff, recompute, fuse) go before partition.
    pub fn standard() -> Self {
        let mut m = Self::new();
        m.add(PartitionPass).add(SchedulePass);
        m
    }

    pub fn add(&mut self, pass: impl Pass + 'static) -> &mut Self {
        self.passes.push(Box::new(pass));
        self
    }

    /// Inserts a pass before the named one (so rewrites can go before `partition`).
    pub fn insert_before(
        &mut self,
        before: &str,
        pass: impl Pass + 'static,
    ) -> anyhow::Result<&mut Self> {
        let Some(i) = self.passes.iter().position(|p| p.name() == before) else {
            bail!("no pass `{before}`; passes: {}", self.names().join(", "));
        };
        self.passes.insert(i, Box::new(pass));
        Ok(self)
    }

    pub fn names(&self) -> Vec<&str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Verify the graph after every pass (forced on in debug builds).
    pub fn verify_each(&mut self, on: bool) -> &mut Self {
        self.verify = on || cfg!(debug_assertions);
        self
    }

    /// Asks for a dump after `pass` (`build` = before any pass, `all` = after each).
    /// Unknown names are refused with the list of passes.
    pub fn dump_after(
        &mut self,
        pass: &str,
        format: DumpFormat,
        view: DumpView,
    ) -> anyhow::Result<&mut Self> {
        let known = pass == BUILD || pass == "all" || self.names().contains(&pass);
        if !known {
            bail!(
                "--dump-after `{pass}`: no such pass; choose one of: {BUILD}, {}, all",
                self.names().join(", ")
            );
        }
        self.dumps.push((pass.to_string(), format, view));
        Ok(self)
    }

    fn dump(&self, after: &str, graph: &Graph, out: &mut Vec<PassDump>) -> anyhow::Result<()> {
        for (want, format, view) in &self.dumps {
            if want == after || want == "all" {
                let text = render(graph, *format, *view)
                    .with_context(|| format!("dumping the graph after `{after}`"))?;
                out.push(PassDump {
                    pass: after.to_string(),
                    format: *format,
                    view: *view,
                    text,
                });
            }
        }
        Ok(())
    }

    /// Runs every pass in order.
    pub fn run(&self, graph: Graph, cx: &mut PassContext) -> anyhow::Result<PassRun> {
        let mut dumps = Vec::new();
        if self.verify {
            graph
                .verify()
                .context("the graph given to the passes does not verify")?;
        }
        self.dump(BUILD, &graph, &mut dumps)?;
        let mut graph = graph;
        for p in &self.passes {
            graph = p
                .run(graph, cx)
                .with_context(|| format!("pass `{}` failed", p.name()))?;
            if self.verify {
                graph.verify().with_context(|| {
                    format!("the graph does not verify after pass `{}`", p.name())
                })?;
            }
            self.dump(p.name(), &graph, &mut dumps)?;
        }
        Ok(PassRun { graph, dumps })
    }
}
