# Installs the build into a fresh prefix, builds examples/embed against that installed copy (nothing
# from the source or build tree on its include or link paths), and runs it.
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... -DTOKENIZER=... -P embed_install.cmake
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
foreach(header actors/router.hpp actors/worker.hpp model/qwen2.hpp net/messages.hpp runtime/node_system.hpp)
  if(NOT EXISTS ${WORK_DIR}/prefix/include/fedmoe/${header})
    message(FATAL_ERROR "installed headers lack ${header}")
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/embed -B ${WORK_DIR}/build -G Ninja
                        -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring examples/embed against the installed fedmoe failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building examples/embed failed (${rc})")
endif()
execute_process(COMMAND ${WORK_DIR}/build/fedmoe-embed ${TOKENIZER} 2 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "fedmoe-embed failed (${rc})")
endif()
file(REMOVE_RECURSE ${WORK_DIR})
