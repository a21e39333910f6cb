//! The process groups of one rank, built from mm-spec's layout (the same groups the
//! launcher prints in its dry run). Each group gets its own PrefixStore namespace
//! (`<kind>/<index>`) on the one TCPStore, so only its members rendezvous for it; a rank
//! creates exactly the groups it belongs to. The flight recorder knows them as "world" and
//! `<kind>[<global ranks>]` ("dp[0,2]", "tp[4,5]", "pp[1,3]"), the same on every member.

use std::sync::Arc;
use std::time::Duration;

use mm_spec::layout::{GroupKind, ParallelDims};

use super::c10d::{Backend, DistError, ProcessGroup, Store};
use super::env::DistEnv;

/// One communicator and the global ranks it spans (in group-rank order).
pub struct Group {
    pub kind: GroupKind,
    pub ranks: Vec<usize>,
    /// Shared with the model's tensor-parallel layers, which keep the group they run on.
    pub pg: Arc<ProcessGroup>,
}

impl Group {
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// This rank's index inside the group.
    pub fn rank(&self) -> usize {
        self.pg.rank
    }
}

/// Every group this rank takes part in, plus the world group.
pub struct ParallelGroups {
    pub dims: ParallelDims,
    pub world: ProcessGroup,
    pub tp: Group,
    pub cp: Group,
    pub dp: Group,
    pub pp: Group,
    /// Gradient-reduction group when cp > 1 (Megatron's data_parallel_group_with_cp).
    pub dp_cp: Group,
    // Held so its store outlives the groups.
    _store: Store,
}

fn kind_name(kind: GroupKind) -> &'static str {
    match kind {
        GroupKind::Tp => "tp",
        GroupKind::Cp => "cp",
        GroupKind::Dp => "dp",
        GroupKind::Pp => "pp",
        GroupKind::DpCp => "dp_cp",
        GroupKind::Embedding => "embedding",
        GroupKind::Mp => "mp",
    }
}

fn check_world(env: &DistEnv, dims: ParallelDims) -> Result<(), DistError> {
    if dims.world() == env.world_size {
        return Ok(());
    }
    Err(DistError {
        rank: env.rank,
        op: "build process groups".into(),
        message: format!(
            "the layout's world size {} (tp {} × cp {} × dp {} × pp {}) differs from WORLD_SIZE {}",
            dims.world(),
            dims.tp(),
            dims.cp(),
            dims.dp(),
            dims.pp(),
            env.world_size
        ),
    })
}

impl ParallelGroups {
    /// Rendezvous and create the world group and this rank's tp/cp/dp/pp/dp_cp groups.
    pub fn init(env: &DistEnv, dims: ParallelDims, backend: Backend) -> Result<ParallelGroups, DistError> {
        check_world(env, dims)?;
        let store = Store::tcp(&env.master_addr, env.master_port, env.rank, env.world_size, env.timeout)?;
        Self::on_store(store, env, dims, backend)
    }

    /// As [`ParallelGroups::init`], on a store the caller already rendezvoused (e.g. a
    /// [`Store::prefixed`] view of one that other checks use too). The groups keep it alive.
    pub fn on_store(
        store: Store,
        env: &DistEnv,
        dims: ParallelDims,
        backend: Backend,
    ) -> Result<ParallelGroups, DistError> {
        check_world(env, dims)?;
        let bind = env.gloo_bind_addr();
        let timeout: Duration = env.timeout;
        let world_store = store.prefixed("world/")?;
        let world = ProcessGroup::new(&world_store, backend, env.rank, env.world_size, bind.as_deref(), timeout)?
            .named("world", &(0..env.world_size).collect::<Vec<_>>());
        let make = |kind: GroupKind| -> Result<Group, DistError> {
            let all = dims.groups(kind);
            let (index, ranks) = all
                .into_iter()
                .enumerate()
                .find(|(_, g)| g.contains(&env.rank))
                .expect("every rank belongs to exactly one group of each kind");
            let me = ranks.iter().position(|r| *r == env.rank).expect("member");
            let sub = store.prefixed(&format!("{}/{index}/", kind_name(kind)))?;
            let pg = ProcessGroup::new(&sub, backend, me, ranks.len(), bind.as_deref(), timeout)?
                .named(super::flight::group_name(kind_name(kind), &ranks), &ranks);
            Ok(Group { kind, ranks, pg: Arc::new(pg) })
        };
        Ok(ParallelGroups {
            dims,
            tp: make(GroupKind::Tp)?,
            cp: make(GroupKind::Cp)?,
            dp: make(GroupKind::Dp)?,
            pp: make(GroupKind::Pp)?,
            dp_cp: make(GroupKind::DpCp)?,
            world,
            _store: store,
        })
    }

    pub fn groups(&self) -> [&Group; 5] {
        [&self.tp, &self.cp, &self.dp, &self.pp, &self.dp_cp]
    }
}
