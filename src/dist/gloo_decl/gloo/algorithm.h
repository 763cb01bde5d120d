// Declaration only, for c10d's ProcessGroupGloo.hpp; see README.md.
#pragma once
